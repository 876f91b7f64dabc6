"""The demo: several tenants' adapters and the base model decoded together in one batch.

Until tenants are trained (`loraplex train`, a later milestone) the demo adapters are PEFT LoRA
adapters with seeded random weights: they show that each request runs with its own adapter, not
what a trained tenant says. They are made once and cached under $LORAPLEX_CACHE/demo-adapters.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from loraplex.models.loader import DEFAULT_MODEL, cache_dir, resolve_model

DEMO_TENANTS: dict[str, dict[str, object]] = {
    "tenant-attn-r8": dict(r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seed=1),
    "tenant-mlp-r16": dict(r=16, targets=["gate_proj", "up_proj", "down_proj"], seed=2),
    "tenant-all-r4": dict(r=4, targets=["q_proj", "v_proj", "up_proj", "down_proj"], seed=3),
}


def make_demo_adapters(strength: float = 0.35) -> dict[str, Path]:
    root = cache_dir() / "demo-adapters"
    paths = {name: root / name for name in DEMO_TENANTS}
    if all((p / "adapter_config.json").is_file() for p in paths.values()):
        return paths
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32)
    for name, spec in DEMO_TENANTS.items():
        r = int(spec["r"])  # type: ignore[call-overload]
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=spec["targets"]))
        g = torch.Generator().manual_seed(int(spec["seed"]))  # type: ignore[call-overload]
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    std = (1.0 if "lora_A" in pname else strength) / math.sqrt(p.shape[1])
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        model.save_pretrained(paths[name])
        base = model.unload()
    return paths


def run_demo(max_tokens: int = 48) -> None:
    from loraplex.llm import LLM
    from loraplex.sampling import SamplingParams

    print(f"loraplex demo: {DEFAULT_MODEL} (bf16) with {len(DEMO_TENANTS)} random-weight PEFT adapters, one batch")
    adapters = make_demo_adapters()
    llm = LLM(lora_modules={k: str(v) for k, v in adapters.items()})
    questions = ["What is the capital of France?", "Give me one tip for a good night's sleep."]
    names: list[str | None] = [None, *adapters]
    jobs = [(q, a) for q in questions for a in names]
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q, _ in jobs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), adapters=[a for _, a in jobs])
    elapsed = time.perf_counter() - t0
    current = None
    for (q, a), out in zip(jobs, outs):
        if q != current:
            print(f"\n=== {q}")
            current = q
        text = " ".join(out.outputs[0].text.split())
        print(f"  [{a or 'base model':>15}] {text}")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"\n{len(jobs)} requests over {len(names)} adapters in one batch: {n} tokens in {elapsed:.1f}s ({n / elapsed:.0f} tok/s)")
