"""Adapters made by PEFT itself: loraplex's greedy tokens equal PEFT's, for ranks 4/8/64, attention-only,
MLP-only and all-linear targets, rslora, layers_to_transform, alpha_pattern and rank_pattern."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import ALL, ATTN, MLP
from loraplex import LLM, SamplingParams

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for writing clean code."}],
]
NEW_TOKENS = 12

CASES: dict[str, dict[str, object]] = {
    "r4_attn": dict(r=4, alpha=8, targets=ATTN, seed=1),
    "r8_mlp": dict(r=8, alpha=16, targets=MLP, seed=2),
    "r64_all": dict(r=64, alpha=32, targets=ALL, seed=3, strength=0.25),
    "r8_rslora": dict(r=8, alpha=16, targets=ALL, seed=4, use_rslora=True),
    "r16_qv_layers": dict(r=16, alpha=16, targets=["q_proj", "v_proj"], seed=5, layers_to_transform=[0, 1, 2, 7, 29]),
    "r8_alpha_pattern": dict(r=8, alpha=16, targets=ALL, seed=6, alpha_pattern={"down_proj": 64}),
    # Patterns as PEFT matches them: against the end of the qualified module name (model.layers.N.self_attn.q_proj).
    "r8_qualified_patterns": dict(r=8, alpha=16, targets=ALL, seed=7,
                                  alpha_pattern={"self_attn.q_proj": 64, "model.layers.2.mlp.up_proj": 2},
                                  rank_pattern={"self_attn.v_proj": 4, r"layers\.1\.mlp\.down_proj": 16}),
}


@pytest.fixture(scope="module")
def adapters(adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {name: adapter_factory(name, **kw) for name, kw in CASES.items()}


@pytest.fixture(scope="module")
def llm(adapters: dict[str, Path]) -> LLM:
    return LLM(dtype="float32", max_lora_rank=64, max_loras=len(adapters),
               lora_modules={k: str(v) for k, v in adapters.items()})


def peft_greedy(hf_base: torch.nn.Module, adapter: Path, prompt_ids: list[int], n: int) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_base, adapter)
    try:
        ids = torch.tensor([prompt_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt_ids):].tolist()
    finally:
        model.unload()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_peft(case: str, llm: LLM, adapters: dict[str, Path], hf_base: torch.nn.Module) -> None:
    """Each adapter alone: loraplex's greedy tokens are PEFT's, token for token."""
    prompts = [llm.apply_chat_template(m) for m in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0)  # as min_new_tokens
    ours = llm.generate(prompts, params, adapters=case)
    base = llm.generate(prompts, params)
    changed = False
    for p, o, b in zip(prompts, ours, base):
        assert o.outputs[0].token_ids == peft_greedy(hf_base, adapters[case], p, NEW_TOKENS)
        changed |= o.outputs[0].token_ids != b.outputs[0].token_ids
    assert changed, "the adapter should change the base model's output (else this test proves nothing)"


def test_adapter_logits_match_peft(llm: LLM, adapters: dict[str, Path], hf_base: torch.nn.Module) -> None:
    """Full-prompt logits with an adapter match PEFT's within fp32 tolerance, for every case."""
    from peft import PeftModel

    prompt = llm.apply_chat_template(PROMPTS[1])
    for case, path in adapters.items():
        ours = llm.engine.prompt_logits(prompt, adapter=case)
        model = PeftModel.from_pretrained(hf_base, path)
        try:
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([prompt])).logits[0].float()
        finally:
            model.unload()
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3, msg=lambda m: f"{case}: {m}")
