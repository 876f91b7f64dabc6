"""The multi-tenant guarantee: in a batch mixing 8 adapters with base-model requests, every request gets
exactly the tokens it gets when it runs alone — batched at once, arriving staggered mid-flight, with
chunked prefill, and with fewer adapter slots than adapters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ALL, ATTN, MLP
from loraplex import LLM, SamplingParams
from loraplex.engine.outputs import RequestOutput

SPECS: list[dict[str, object]] = [
    dict(r=4, alpha=8, targets=ATTN), dict(r=8, alpha=16, targets=MLP), dict(r=16, alpha=16, targets=ALL),
    dict(r=8, alpha=8, targets=["q_proj", "v_proj"]), dict(r=2, alpha=4, targets=["o_proj", "down_proj"]),
    dict(r=16, alpha=32, targets=ALL, use_rslora=True), dict(r=12, alpha=12, targets=["up_proj", "k_proj"]),
    dict(r=8, alpha=16, targets=ALL, layers_to_transform=list(range(0, 30, 2))),
]
QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "Write one sentence about cats.",
    "What is 2 + 2?", "Describe the sea in five words.", "Who wrote Hamlet?",
]


@pytest.fixture(scope="module")
def tenants(adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {f"t{i}": adapter_factory(f"mixed{i}", seed=100 + i, **spec) for i, spec in enumerate(SPECS)}


def make_llm(tenants: dict[str, Path], **kw: object) -> LLM:
    return LLM(dtype="float32", lora_modules={k: str(v) for k, v in tenants.items()}, **kw)  # type: ignore[arg-type]


def workload(llm: LLM, tenants: dict[str, Path]) -> list[tuple[list[int], str | None, SamplingParams]]:
    """12 requests: one per adapter plus 4 on the base model; greedy and seeded sampling mixed."""
    names: list[str | None] = list(tenants) + [None] * 4
    jobs = []
    for i, name in enumerate(names):
        prompt = llm.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        if i % 3 == 2:
            params = SamplingParams(max_tokens=10 + i, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=10 + i, temperature=0, ignore_eos=True)
        jobs.append((prompt, name, params))
    return jobs


def tokens(out: RequestOutput) -> list[int]:
    return out.outputs[0].token_ids


@pytest.fixture(scope="module")
def solo(tenants: dict[str, Path]) -> tuple[LLM, list, list[list[int]]]:
    llm = make_llm(tenants, enable_prefix_caching=False)  # the reference computes every prompt in full
    jobs = workload(llm, tenants)
    alone = [tokens(llm.generate([p], s, adapters=[a])[0]) for p, a, s in jobs]
    # The adapters must matter, else equality below proves nothing.
    assert len({tuple(t) for t, (_, a, s) in zip(alone, jobs) if s.greedy and jobs[0][0] == _}) >= 1
    return llm, jobs, alone


@pytest.mark.slow
def test_batched_equals_alone(solo: tuple[LLM, list, list[list[int]]], tenants: dict[str, Path]) -> None:
    """All 12 requests in one batch: each gets its solo tokens; again, with their prompts found in the prefix
    cache (each adapter's own blocks only), they still do."""
    _, jobs, alone = solo
    llm = make_llm(tenants)
    for _ in range(2):
        outs = llm.generate([p for p, _, _ in jobs], [s for _, _, s in jobs], adapters=[a for _, a, _ in jobs])
        assert [tokens(o) for o in outs] == alone
    assert all(o.num_cached_tokens > 0 for o in outs)


def test_adapters_change_outputs(solo: tuple[LLM, list, list[list[int]]]) -> None:
    """Same question under different adapters gives different tokens (the mapping reaches the layers)."""
    llm, jobs, _ = solo
    prompt = jobs[0][0]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    names: list[str | None] = [None, "t0", "t1", "t2", "t5"]
    outs = llm.generate([prompt] * len(names), params, adapters=names)
    assert len({tuple(tokens(o)) for o in outs}) == len(names)


@pytest.mark.parametrize("chunk", [512, 24])
def test_staggered_arrivals_equal_alone(solo: tuple[LLM, list, list[list[int]]], tenants: dict[str, Path], chunk: int) -> None:
    """Requests join a running batch mid-flight (and, with chunk=24, long prompts prefill in chunks
    alongside decodes): each still gets its solo tokens."""
    _, jobs, alone = solo
    llm = make_llm(tenants, max_num_batched_tokens=chunk)
    engine = llm.engine
    done: dict[str, list[int]] = {}
    ids: list[str] = []
    pending = list(enumerate(jobs))
    step = 0
    while pending or engine.has_unfinished_requests():
        # 0, 1 or 2 new arrivals every step.
        for _ in range(step % 3):
            if pending:
                i, (p, a, s) = pending.pop(0)
                ids.append(engine.add_request(p, s, a, request_id=f"r{i}"))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = tokens(out)
        step += 1
    assert [done[f"r{i}"] for i in range(len(jobs))] == alone


def test_fewer_slots_than_adapters(solo: tuple[LLM, list, list[list[int]]], tenants: dict[str, Path]) -> None:
    """With 3 device slots for 8 adapters, requests wait for slots, all complete, each with its solo tokens."""
    _, jobs, alone = solo
    llm = make_llm(tenants, max_loras=3)
    outs = llm.generate([p for p, _, _ in jobs], [s for _, _, s in jobs], adapters=[a for _, a, _ in jobs])
    assert [tokens(o) for o in outs] == alone
    assert llm.engine.adapters.slots.evictions > 0
