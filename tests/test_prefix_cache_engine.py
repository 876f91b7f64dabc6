"""Prefix caching on the real model: tokens with cache hits equal tokens without (fp32, greedy) in mixed-adapter
batches, and no K/V ever crosses a namespace: base vs adapter, A vs B, A@1 vs A@2, an adapter unregistered and
registered again under its name with other weights, another cache salt. Each case is shown twice: by the
hit counters and by the outputs (equal to an engine without caching, on the same adapter version)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import ALL, ATTN
from loraplex import LLM, SamplingParams
from loraplex.adapters.peft_format import load_peft_adapter
from loraplex.engine.admin import Register, Unregister

SYSTEM = ("You are the support assistant of a company that sells bicycles, spare parts and repair services in "
          "three cities. Answer briefly and politely, name the shop that can help, and never invent prices. "
          "If the question is not about bicycles, say that you can only help with bicycles.")
QUESTIONS = ["Where can I fix a flat tyre?", "Do you sell helmets?", "What is the capital of France?",
             "My chain keeps falling off.", "Can I rent a bike for a day?"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def small(**kw: Any) -> LLM:
    """An fp32 engine with a small KV cache (the tests hold several at once)."""
    return LLM(dtype="float32", kv_cache_memory=64 << 20, max_model_len=1024, **kw)


@pytest.fixture(scope="module")
def adapters(adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {"A": adapter_factory("pc-a", seed=11, r=8, alpha=16, targets=ALL),
            "B": adapter_factory("pc-b", seed=12, r=8, alpha=16, targets=ATTN),
            "A2": adapter_factory("pc-a2", seed=13, r=8, alpha=16, targets=ALL)}


@pytest.fixture(scope="module")
def reference(adapters: dict[str, Path]) -> LLM:
    """The same adapters on an engine that never caches: every prompt computed in full."""
    return small(enable_prefix_caching=False,
                 lora_modules={"A": str(adapters["A"]), "B": str(adapters["B"]), "A2": str(adapters["A2"])})


def prompt(llm: LLM, question: str) -> list[int]:
    return llm.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def hits(llm: LLM) -> dict[str, int]:
    return dict(llm.engine.snapshot().prefix_cache.hits)


def run(llm: LLM, prompts: list[list[int]], adapters: list[str | None], salt: str | None = None) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, adapters=adapters, cache_salt=salt)]


def test_hits_give_the_tokens_of_a_full_computation(reference: LLM, adapters: dict[str, Path]) -> None:
    llm = small(lora_modules={"A": str(adapters["A"]), "B": str(adapters["B"])})
    names: list[str | None] = [None, "A", "B", "A", None]
    prompts = [prompt(llm, q) for q in QUESTIONS]
    want = run(reference, prompts, names)
    assert len({tuple(t) for t in want}) == len(want)
    assert run(llm, prompts, names) == want  # first time: one step, nothing cached yet
    assert sum(hits(llm).values()) == 0
    again = run(llm, prompts, names)  # every system prompt now found in its own namespace
    assert again == want
    assert all(v > 0 for v in hits(llm).values())
    staggered = small(max_num_batched_tokens=40, lora_modules={"A": str(adapters["A"]), "B": str(adapters["B"])})
    got: dict[str, list[int]] = {}
    engine = staggered.engine
    for i, (p, a) in enumerate(zip(prompts, names)):  # arrivals while others decode, prompts in 40-token chunks
        engine.add_request(p, GREEDY, a, request_id=str(i))
        for _ in range(3):
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert [got[str(i)] for i in range(len(prompts))] == want
    assert sum(hits(staggered).values()) > 0


@pytest.mark.slow
def test_no_block_crosses_a_namespace(reference: LLM, adapters: dict[str, Path], tmp_path: Path) -> None:
    llm = small(lora_modules={"A": str(adapters["A"]), "B": str(adapters["B"])})
    p = prompt(llm, QUESTIONS[0])
    base = llm.engine.facts.model_name

    def fresh(name: str, out: list[list[int]], expect: list[int]) -> None:
        assert out == [expect], f"{name}: not the tokens of a full computation"

    fresh("base", run(llm, [p], [None]), run(reference, [p], [None])[0])
    assert hits(llm).get(base, 0) == 0
    for name in ("A", "B"):  # the base model's blocks are not theirs, nor each other's
        fresh(name, run(llm, [p], [name]), run(reference, [p], [name])[0])
        assert hits(llm).get(name, 0) == 0, f"{name} hit another namespace's blocks"
    run(llm, [p], ["A"])
    assert hits(llm)["A"] > 0  # its own blocks it finds
    # A new version of A, with other weights: a namespace of its own.
    llm.engine.admin(Register("A", adapters["A2"]))
    a_hits = hits(llm)["A"]
    fresh("A@2", run(llm, [p], ["A"]), run(reference, [p], ["A2"])[0])
    assert hits(llm)["A"] == a_hits
    # Unregistered, then registered again under the same name with other weights: neither version 1's nor
    # version 2's blocks are found.
    llm.engine.admin(Unregister("A"))
    llm.engine.admin(Register("A", adapters["B"]))
    a_hits = hits(llm)["A"]
    fresh("A re-registered", run(llm, [p], ["A"]), run(reference, [p], ["B"])[0])
    assert hits(llm)["A"] == a_hits
    # A cache salt: a namespace per salt, on top of the adapter's.
    base_hits = hits(llm).get(base, 0)
    fresh("salted", run(llm, [p], [None], salt="tenant-1"), run(reference, [p], [None])[0])
    assert hits(llm).get(base, 0) == base_hits
    run(llm, [p], [None], salt="tenant-1")
    assert hits(llm)[base] > base_hits


def test_the_weights_digest_names_the_files_content(adapters: dict[str, Path], tmp_path: Path) -> None:
    """The digest that roots an adapter's namespace (so that one reloaded from disk after its files changed
    finds none of its old blocks) follows the files' content, not the path or the name."""
    shapes = small().engine.adapters.loads.load.targets

    def digest(path: Path, name: str = "x") -> bytes:
        return load_peft_adapter(name, path, shapes, 16).digest

    copy = tmp_path / "copy"
    shutil.copytree(adapters["A"], copy)
    assert digest(adapters["A"]) == digest(copy, "y")
    assert digest(adapters["A"]) != digest(adapters["A2"])
    (copy / "adapter_model.safetensors").write_bytes((adapters["A2"] / "adapter_model.safetensors").read_bytes())
    assert digest(copy) != digest(adapters["A"])


def test_reset_and_disable(adapters: dict[str, Path]) -> None:
    llm = small()
    p = prompt(llm, QUESTIONS[1])
    run(llm, [p], [None])
    assert llm.engine.blocks.num_cached > 0
    assert llm.reset_prefix_cache() > 0 and llm.engine.blocks.num_cached == 0
    run(llm, [p], [None])
    assert hits(llm).get(llm.engine.facts.model_name, 0) == 0
    off = small(enable_prefix_caching=False)
    run(off, [p], [None])
    run(off, [p], [None])
    snap = off.engine.snapshot().prefix_cache
    assert not snap.enabled and snap.cached_blocks == 0 and sum(snap.hits.values()) == 0
