"""Penalties, biases, token masks and log-probabilities: each against transformers' own logits processors (or
OpenAI's formula where transformers has none) on the same logits, then on the model: log-probabilities equal
log_softmax of transformers' logits (base) and PEFT's (adapter); a request with penalties, a bias or logprobs in a
mixed batch leaves every other request's tokens as they are alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import ALL
from loraplex import LLM, SamplingParams
from loraplex.engine import logits_processors
from loraplex.engine.logits_processors import RowState
from loraplex.engine.sampler import apply_min_p, logprobs_of, sample

V = 64


def rows_for(params: list[SamplingParams], prompt: list[int], outputs: list[list[int]],
             bad: list[list[list[int]]] | None = None) -> list[RowState]:
    return [RowState(p, torch.tensor(prompt), o, (bad or [[]] * len(params))[i]) for i, (p, o) in enumerate(zip(params, outputs))]


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_is_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt, out = [3, 5, 7, 5], [9, 3, 11]
    x = logits(2)
    ours = logits_processors.apply(x.clone(), rows_for([SamplingParams(repetition_penalty=1.7), SamplingParams()],
                                                       prompt, [out, out]))
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), x[:1].clone())
    torch.testing.assert_close(ours[:1], ref)
    assert torch.equal(ours[1], x[1]), "a row without penalties changed"


def test_frequency_and_presence_penalties_are_openais() -> None:
    out = [4, 4, 4, 9, 2]
    x = logits(1)
    ours = logits_processors.apply(x.clone(), rows_for([SamplingParams(frequency_penalty=0.5, presence_penalty=1.25)],
                                                       [4, 8], [out]))
    want = x.clone()
    for tok in set(out):
        want[0, tok] -= 0.5 * out.count(tok) + 1.25  # OpenAI: counts of generated tokens, once for presence
    torch.testing.assert_close(ours, want)


def test_logit_bias_and_bad_words_are_transformers() -> None:
    from transformers import NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor

    x = logits(1)
    bias = {5: 10.0, 17: -100.0}
    ours = logits_processors.apply(x.clone(), rows_for([SamplingParams(logit_bias=bias)], [1], [[2]]))
    ref = SequenceBiasLogitsProcessor({(k,): v for k, v in bias.items()})(torch.tensor([[1, 2]]), x.clone())
    torch.testing.assert_close(ours, ref)
    bad = [[30], [8, 9, 10]]  # a one-token word, and one whose last token is banned only after 8 9
    for history in ([1, 2, 8, 9], [1, 2, 9, 8]):
        got = logits_processors.apply(x.clone(), rows_for([SamplingParams(bad_words=["x"])], history[:2], [history[2:]], [bad]))
        ref = NoBadWordsLogitsProcessor(bad, eos_token_id=0)(torch.tensor([history]), x.clone())
        torch.testing.assert_close(got, ref)


def test_allowed_tokens_and_min_p() -> None:
    from transformers import MinPLogitsWarper

    x = logits(2)
    got = logits_processors.apply(x.clone(), rows_for([SamplingParams(allowed_token_ids=[0, 7, 63]), SamplingParams()],
                                                      [1], [[], []]))
    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [0, 7, 63] and torch.equal(got[1], x[1])
    ours = apply_min_p(x.clone(), torch.tensor([0.1, 0.0]))
    ref = MinPLogitsWarper(0.1)(None, x[:1].clone())
    assert torch.equal(torch.isinf(ours[:1]), torch.isinf(ref)) and torch.isfinite(ours[1]).all()


def test_logprobs_are_of_the_sampled_distribution_before_truncation() -> None:
    x = logits(3)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.5, top_k=2, logprobs=0, seed=1),
              SamplingParams(temperature=0.7)]
    tokens = sample(x.clone(), params, [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    lps = logprobs_of(x, params, tokens)
    assert lps[2] is None and lps[1] is not None and lps[1].top == []
    ref0, ref1 = x[0].log_softmax(-1), (x[1] / 0.5).log_softmax(-1)
    assert lps[0] is not None and lps[0].logprob == pytest.approx(float(ref0[tokens[0]]), abs=1e-5)
    assert [t for t, _ in lps[0].top] == ref0.topk(3).indices.tolist() and tokens[0] == lps[0].top[0][0]
    assert lps[1].logprob == pytest.approx(float(ref1[tokens[1]]), abs=1e-5)  # temperature, not top-k, shapes it


# ---- on the model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(adapter_factory: Callable[..., Path]) -> Path:
    return adapter_factory("logits-a", r=8, alpha=16, targets=ALL, seed=21)


@pytest.fixture(scope="module")
def llm(adapter: Path) -> LLM:
    return LLM(dtype="float32", lora_modules={"a": str(adapter)}, max_model_len=512, kv_cache_memory=64 << 20)


def reference_logprobs(model: torch.nn.Module, prompt: list[int], out: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each generated position: [len(out), V]."""
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(out)].log_softmax(-1)


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_logprobs_equal_the_references(which: str, llm: LLM, adapter: Path, hf_base: torch.nn.Module) -> None:
    prompt = llm.apply_chat_template([{"role": "user", "content": "Name a large animal."}])
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, logprobs=5, ignore_eos=True),
                       adapters=None if which == "base" else "a")[0].outputs[0]
    if which == "base":
        ref = reference_logprobs(hf_base, prompt, out.token_ids)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(hf_base, adapter)
        try:
            ref = reference_logprobs(model, prompt, out.token_ids)
        finally:
            model.unload()
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 8
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.logprob == pytest.approx(float(ref[i, tok]), abs=2e-3)
        top_v, top_i = ref[i].topk(5)
        assert [t for t, _ in lp.top][:2] == top_i.tolist()[:2]
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=2e-3)


def test_penalised_greedy_decoding_follows_transformers(llm: LLM, hf_base: torch.nn.Module) -> None:
    """Greedy with repetition, frequency and presence penalties and a bias: each token is the argmax of
    transformers' logits after transformers' repetition processor and OpenAI's formulas."""
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt = llm.apply_chat_template([{"role": "user", "content": "Repeat the word cat five times."}])
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4,
                       presence_penalty=0.3, logit_bias={28: 2.0})
    got = llm.generate([prompt], p)[0].outputs[0].token_ids
    out: list[int] = []
    for _ in range(10):
        with torch.no_grad():
            x = hf_base(input_ids=torch.tensor([prompt + out])).logits[:, -1].float()
        x[0, 28] += 2.0
        x = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + out]), x)
        for tok in set(out):
            x[0, tok] -= 0.4 * out.count(tok) + 0.3
        out.append(int(x.argmax()))
    assert got == out


def test_processing_in_a_mixed_batch_touches_no_one_else(llm: LLM) -> None:
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}])
               for q in ("Tell me about cats.", "Tell me about dogs.", "Count to ten.", "Say hello.")]
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    special = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5, logprobs=2),
               SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True, presence_penalty=1.0,
                              logit_bias={11: 5.0}, min_p=0.05, bad_words=["the"]),
               plain, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, allowed_token_ids=list(range(300, 900)))]
    adapters = ["a", None, "a", None]
    alone = [llm.generate([p], s, adapters=[a])[0].outputs[0].token_ids for p, s, a in zip(prompts, special, adapters)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, special, adapters=adapters)]
    assert together == alone
    assert all(300 <= t < 900 for t in alone[3])
    banned = [seq[0] for seq in llm.engine.preparer.bad_words(["the"]) if len(seq) == 1]
    assert banned and not set(banned) & set(alone[1])
    assert alone[2] == llm.generate([prompts[2]], plain, adapters=["a"])[0].outputs[0].token_ids


def test_prompt_logprobs_equal_the_reference_and_survive_chunking(adapter: Path, hf_base: torch.nn.Module) -> None:
    """prompt_logprobs: each prompt token's log-probability given the ones before, as transformers computes it,
    also when the prompt is prefilled in chunks of 7 (and not served from the prefix cache)."""
    llm = LLM(dtype="float32", max_model_len=512, kv_cache_memory=64 << 20, max_num_batched_tokens=7)
    prompt = llm.apply_chat_template([{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}])
    for _ in range(2):  # the second time its blocks are cached: it is still computed in full
        out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    with torch.no_grad():
        ref = hf_base(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    for p in range(1, len(prompt)):
        lp = out.prompt_logprobs[p]
        assert lp is not None and lp.logprob == pytest.approx(float(ref[p - 1, prompt[p]]), abs=2e-3)
        assert len(lp.top) == 3
