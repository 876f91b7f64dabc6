"""Fair share in the engine: a tenant (here an adapter) flooding a small batch does not hold a quiet tenant's request
behind its backlog, and every answer, the flooding tenant's preempted one included, is the one it gets alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ATTN
from loraplex import LLM, SamplingParams

FLOOD = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
QUIET = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(adapter_factory: Callable[..., Path]) -> LLM:
    mods = {n: str(adapter_factory(f"fair_{n}", r=4, targets=ATTN, seed=90 + i))
            for i, n in enumerate(("flood", "quiet"))}
    return LLM(dtype="float32", lora_modules=mods, max_num_seqs=3, max_model_len=256, kv_cache_memory=32 << 20)


def test_a_quiet_tenant_runs_at_once_beside_a_flood(llm: LLM) -> None:
    engine = llm.engine
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Count to {i}."}]) for i in range(8)]
    quiet_prompt = llm.apply_chat_template([{"role": "user", "content": "Name a colour."}])
    alone = {i: llm.generate([p], FLOOD, adapters="flood", use_tqdm=False)[0].outputs[0].token_ids
             for i, p in enumerate(prompts)}
    quiet_alone = llm.generate([quiet_prompt], QUIET, adapters="quiet", use_tqdm=False)[0].outputs[0].token_ids
    ids = {engine.add_request(p, FLOOD, "flood"): i for i, p in enumerate(prompts)}
    for _ in range(3):
        engine.step()
    quiet = engine.add_request(quiet_prompt, QUIET, "quiet")
    finals, steps, quiet_steps = {}, 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
                if out.request_id == quiet:
                    quiet_steps = steps + 1
        steps += 1
    # First come, first served, it would wait for the flood's first three to finish (over 20 steps).
    assert quiet_steps is not None and quiet_steps <= len(quiet_alone) + 2, quiet_steps
    assert finals[quiet] == quiet_alone
    assert {ids[r]: t for r, t in finals.items() if r in ids} == alone
