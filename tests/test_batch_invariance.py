"""Batch-invariant serving (issue 41): with `batch_invariant`, a request's logits have the bits they have when it
runs alone, whatever else shares its steps: base-model requests and several adapters mixed, prefills beside
decodes, and prompts whose prefix comes from the prefix cache. Compared through the log-probabilities of every
prompt and sampled token (log_softmax of the fp32 logits row: one bit of a logit changes them), in float32 and
bfloat16, on the C++ kernels. (Where a chunked prefill splits still changes the attention's bits; the torch
fallback kernels are not invariant yet.)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import ALL, ATTN, MLP
from loraplex import LLM, SamplingParams
from loraplex.engine.outputs import RequestOutput

Job = tuple[str, str | None, list[int], int]  # request id, adapter (None: the base model), prompt, max_tokens
SHARED = [5, 17, 99, 1000, 23, 7, 300, 41] * 4  # two full KV blocks: a prefix the cache can hold


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def llm(request: pytest.FixtureRequest, adapter_factory: Callable[..., Path]) -> Iterator[LLM]:
    mods = {"attn": adapter_factory("inv-attn", r=4, alpha=8, targets=ATTN, seed=71),
            "mlp": adapter_factory("inv-mlp", r=8, alpha=16, targets=MLP, seed=72),
            "all": adapter_factory("inv-all", r=16, alpha=16, targets=ALL, seed=73)}
    llm = LLM(dtype=request.param, lora_modules={k: str(v) for k, v in mods.items()}, max_loras=4, max_model_len=256,
              batch_invariant=True)
    inv = llm.engine.facts.batch_invariance
    if not inv.enabled:
        pytest.skip(inv.detail)
    yield llm


def sampling(n: int, prompt: bool) -> SamplingParams:
    """Greedy, with the log-probabilities of the sampled tokens and, with `prompt`, of the prompt's (a request
    that asks for those computes its whole prompt: it never reads the prefix cache)."""
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=3,
                          prompt_logprobs=3 if prompt else None)


def drain(llm: LLM, final: dict[str, RequestOutput]) -> None:
    while llm.engine.has_unfinished_requests():
        final.update({o.request_id: o for o in llm.engine.step() if o.finished})


def bits(out: RequestOutput) -> tuple[object, ...]:
    c = out.outputs[0]
    assert out.error is None
    return c.token_ids, c.logprobs, out.prompt_logprobs


def alone(llm: LLM, jobs: list[Job], keep_cache: bool, prompt: bool = True) -> dict[str, tuple[object, ...]]:
    solo = {}
    for rid, adapter, tokens, n in jobs:
        final: dict[str, RequestOutput] = {}
        llm.engine.add_request(tokens, sampling(n, prompt), adapter, rid)
        drain(llm, final)
        solo[rid] = bits(final[rid])
        if not keep_cache:
            llm.reset_prefix_cache()
    return solo


def together(llm: LLM, jobs: list[Job], every: int, cached: dict[str, int] | None = None, prompt: bool = True
             ) -> dict[str, tuple[object, ...]]:
    """The jobs added `every` at a time with a step between, so prefills run beside other requests' decodes.
    `cached` gets each job's prompt tokens read from the prefix cache."""
    final: dict[str, RequestOutput] = {}
    for k, (rid, adapter, tokens, n) in enumerate(jobs):
        llm.engine.add_request(tokens, sampling(n, prompt), adapter, rid + "+")
        if k % every == every - 1:
            final.update({o.request_id: o for o in llm.engine.step() if o.finished})
    drain(llm, final)
    if cached is not None:
        cached.update({rid: final[rid + "+"].num_cached_tokens for rid, _, _, _ in jobs})
    return {rid: bits(final[rid + "+"]) for rid, _, _, _ in jobs}


def random_jobs(seed: int, count: int, prefix: list[int] | None = None) -> list[Job]:
    rng = random.Random(seed)
    adapters = [None, "attn", "mlp", "all"]
    return [(f"j{i}", rng.choice(adapters),
             (prefix if prefix is not None and i % 2 else []) + [rng.randrange(100, 40000)
                                                                  for _ in range(rng.randrange(1, 40))],
             rng.randrange(1, 6)) for i in range(count)]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_rows_bits_are_its_own_whatever_shares_the_batch(llm: LLM, seed: int) -> None:
    """Random requests (base and three adapters of different targets and ranks; prompts of 1 to 39 tokens; 1 to 5
    tokens each) alone, then together in steps of 2 to 150 rows that mix prefill and decode: every prompt and
    sampled token's log-probabilities are equal, bit for bit."""
    llm.reset_prefix_cache()
    jobs = random_jobs(seed, 16)
    solo = alone(llm, jobs, keep_cache=False)
    assert together(llm, jobs, every=3 + seed) == solo


def test_a_cached_prefix_gives_the_bits_of_the_requests_own_prefill(llm: LLM) -> None:
    """Half the requests share a two-block prefix. Alone, each computes its prefix itself (the cache emptied before
    each); together, after a request per adapter has left the prefix in the cache, they read it from there: the
    bits are the same."""
    llm.reset_prefix_cache()
    jobs = random_jobs(2, 12, SHARED)
    solo = alone(llm, jobs, keep_cache=False, prompt=False)
    alone(llm, [(f"warm-{a}", a, SHARED + [1], 1) for a in (None, "attn", "mlp", "all")], keep_cache=True)
    cached: dict[str, int] = {}
    assert together(llm, jobs, every=2, cached=cached, prompt=False) == solo
    assert sum(n >= len(SHARED) for n in cached.values()) >= 3, cached
