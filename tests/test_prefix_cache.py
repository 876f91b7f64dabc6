"""Prefix caching, without a model: the block manager's hash chains and reference counts, and the scheduler
skipping cached tokens. Namespaces (adapter version + weights digest, cache salt) keep tenants apart.
The model-level proofs (outputs equal with and without hits, no cross-tenant hit) are in test_prefix_cache_engine.py."""

from __future__ import annotations

import random
from collections.abc import Hashable

from loraplex.adapters.key import AdapterKey
from loraplex.engine.block_manager import BlockManager, namespace
from loraplex.engine.request import Request, RequestStatus
from loraplex.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.sampling import SamplingParams

from test_scheduler import FAKE_TOKEN, Slots

BS = 4


def req(rid: str, tokens: list[int], adapter: Hashable | None = None, digest: bytes = b"", salt: str | None = None,
        max_tokens: int = 2) -> Request:
    r = Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), adapter, arrival=0.0, cache_salt=salt)  # type: ignore[arg-type]
    r.cache_namespace = namespace(adapter, digest, salt)
    return r


def compute(bm: BlockManager, r: Request, upto: int | None = None) -> None:
    """Allocate and 'compute' r's tokens up to `upto` (default: all), then commit its full blocks."""
    n = r.num_tokens if upto is None else upto
    bm.allocate(r, n)
    r.num_computed_tokens = n
    bm.commit(r)


def held(*reqs: Request) -> list[list[int]]:
    return [r.block_ids for r in reqs]


PROMPT = list(range(100, 100 + 4 * BS + 2))  # 4 full blocks and 2 tokens


def test_a_computed_prefix_is_found_by_the_same_namespace_only() -> None:
    bm = BlockManager(32, BS, enable_caching=True)
    a = req("a", PROMPT)
    compute(bm, a)
    assert bm.num_cached == 4 and bm.match(req("again", PROMPT)) == a.block_ids[:4]
    assert bm.match(req("longer", PROMPT + [1, 2, 3])) == a.block_ids[:4]
    assert bm.match(req("diverges", PROMPT[:6] + [0] + PROMPT[7:])) == a.block_ids[:1]  # block 2 differs
    for other in (req("lora", PROMPT, adapter="A@1", digest=b"x"), req("salted", PROMPT, salt="u1")):
        assert bm.match(other) == [], "a block crossed namespaces"
    bm.check(held(a))


def test_adapter_identity_is_name_version_and_weights() -> None:
    bm = BlockManager(64, BS, enable_caching=True)
    first = req("a1", PROMPT, adapter="A@1", digest=b"weights-1")
    compute(bm, first)
    assert len(bm.match(req("same", PROMPT, adapter="A@1", digest=b"weights-1"))) == 4
    for name, adapter, digest in (("other adapter", "B@1", b"weights-1"), ("other version", "A@2", b"weights-1"),
                                  ("same key, reloaded with other weights", "A@1", b"weights-2"),
                                  ("base model", None, b"")):
        assert bm.match(req(name, PROMPT, adapter=adapter, digest=digest)) == [], name


def test_the_last_token_is_always_computed() -> None:
    """A prompt that is entirely cached still computes its last token (its logits), in a block of its own."""
    bm = BlockManager(16, BS, enable_caching=True)
    exact = list(range(1, 3 * BS + 1))  # exactly 3 full blocks
    compute(bm, req("a", exact))
    assert len(bm.match(req("b", exact))) == 2
    assert len(bm.match(req("c", exact + [9]))) == 3


def test_shared_blocks_are_counted_and_freed_to_the_cache() -> None:
    bm = BlockManager(16, BS, enable_caching=True)
    a = req("a", PROMPT)
    compute(bm, a)
    b = req("b", PROMPT)
    found = bm.match(b)
    assert bm.reclaimed_by(found) == 0  # all held by a: taking them costs no free block
    bm.take_cached(b, found)
    assert b.num_computed_tokens == 4 * BS and b.block_ids == a.block_ids[:4]
    compute(bm, b)
    bm.check(held(a, b))
    free_before = bm.num_free
    bm.free(a)
    bm.check(held(b))
    assert bm.num_free == free_before + 1  # only a's private tail block; the shared four are still held by b
    bm.free(b)
    bm.check([])
    assert bm.num_free == 16 and bm.num_cached == 4
    c = req("c", PROMPT)
    found = bm.match(c)
    assert len(found) == 4 and bm.reclaimed_by(found) == 4  # cached but unheld: taking them uses free capacity


def test_lru_reclaims_cached_blocks_tail_first_when_space_is_needed() -> None:
    bm = BlockManager(8, BS, enable_caching=True)
    a = req("a", PROMPT)  # 5 blocks, 4 of them full
    compute(bm, a)
    bm.free(a)
    assert bm.num_free == 8 and bm.num_cached == 4
    filler = req("f", [7] * (5 * BS))  # needs 5 blocks: 4 empty ones, then the least recent cached one
    bm.allocate(filler, 5 * BS)
    assert bm.evictions == 1 and bm.num_cached == 3
    assert len(bm.match(req("again", PROMPT))) == 3, "the head of the prefix must outlive its tail"
    bm.check(held(filler))


def test_same_prefix_computed_twice_at_once_keeps_one_copy() -> None:
    bm = BlockManager(32, BS, enable_caching=True)
    a, b = req("a", PROMPT), req("b", PROMPT)
    compute(bm, a)
    compute(bm, b)  # b could not find a's blocks (admitted in the same step); its copies stay private
    assert bm.num_cached == 4
    bm.free(b)
    bm.check(held(a))
    assert bm.num_free == 32 - len(a.block_ids)


def test_reset_forgets_every_block_and_running_requests_keep_theirs() -> None:
    bm = BlockManager(32, BS, enable_caching=True)
    a, done = req("a", PROMPT), req("done", [5] * (3 * BS))
    compute(bm, a)
    compute(bm, done)
    bm.free(done)
    assert bm.reset() == 4 + 3
    bm.check(held(a))
    assert bm.num_cached == 0 and bm.match(req("b", PROMPT)) == []
    bm.free(a)
    bm.check([])
    assert bm.num_free == 32


def test_caching_off_finds_nothing() -> None:
    bm = BlockManager(32, BS, enable_caching=False)
    compute(bm, req("a", PROMPT))
    assert bm.num_cached == 0 and bm.match(req("b", PROMPT)) == []


# ---- the scheduler ---------------------------------------------------------------------------------------


class DigestSlots(Slots):
    def digest(self, key: Hashable) -> bytes:
        return f"weights of {key}".encode()


def sched(num_blocks: int = 64, max_num_batched_tokens: int = 64, max_loras: int = 4) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, enable_caching=True), DigestSlots(max_loras), max_num_seqs=8,
                     max_num_batched_tokens=max_num_batched_tokens, max_skips=2)


def run_step(s: Scheduler, preempted: list[Request] | None = None) -> dict[str, int]:
    out = s.schedule()
    if preempted is not None:
        preempted += out.preempted
    for q in out.seqs:
        assert len(q.request.block_ids) >= s.blocks.blocks_for(q.request.num_computed_tokens + q.num_tokens)
    s.advance(out.seqs)
    for q in out.seqs:
        r = q.request
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(FAKE_TOKEN)
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                s.finish(r, "length")
    s.blocks.check(held(*s.running))
    return {q.request.request_id: q.num_tokens for q in out.seqs}


def plain(rid: str, tokens: list[int], adapter: str | None = None, salt: str | None = None) -> Request:
    """A request as the engine queues it ('A@1': adapter A, version 1); its namespace is set at admission."""
    key = None if adapter is None else AdapterKey(*adapter.split("@"))
    return Request(rid, list(tokens), SamplingParams(max_tokens=2), key, arrival=0.0, cache_salt=salt)


def test_a_later_request_computes_only_what_is_not_cached() -> None:
    s = sched()
    s.add(plain("a", PROMPT))
    assert run_step(s) == {"a": len(PROMPT)}
    s.add(plain("b", PROMPT + [1, 2]))
    s.add(plain("c", PROMPT, adapter="A@1"))
    assert run_step(s) == {"a": 1, "b": 2 + 2, "c": len(PROMPT)}  # b: 16 cached tokens, c: another tenant
    b = next(r for r in s.running if r.request_id == "b")
    assert b.num_cached_tokens == 4 * BS
    pc = s.prefix_cache
    assert pc.queries == {None: 2 * len(PROMPT) + 2, "A": len(PROMPT)} and pc.hits == {None: 4 * BS, "A": 0}


def test_admission_counts_only_the_blocks_a_request_needs() -> None:
    """With 2 free blocks, a 5-block prompt whose first 4 blocks are held by a running request is admitted."""
    s = sched(num_blocks=7)
    long = [3] * (4 * BS) + [4, 5]
    s.add(plain("a", long))
    run_step(s)  # a holds 5 blocks
    s.add(plain("b", long))
    assert s.blocks.num_free == 2
    assert run_step(s) == {"a": 1, "b": 2}
    s.add(plain("c", [9] * (3 * BS)))  # needs 3 blocks: only 1 is left, waits
    assert "c" not in run_step(s)


def test_a_preempted_request_finds_its_own_prefix_again() -> None:
    s = sched(num_blocks=6, max_num_batched_tokens=64)
    s.add(plain("a", [1] * (4 * BS)))
    run_step(s)
    victim = s.running[0]
    s._preempt(victim, SchedulerOutput())
    assert victim.status is RequestStatus.WAITING and victim.num_computed_tokens == 0
    assert run_step(s) == {"a": 1}  # 4 blocks + 1 generated token: all but the last token found cached
    assert victim.num_computed_tokens == 4 * BS + 1


def test_randomized_run_keeps_the_books() -> None:
    """Shared system prompts over 3 namespaces and salts, preemption (small cache), aborts and resets: after every
    step the reference counts equal the requests' block lists, and at the end every block is free or cached."""
    rng = random.Random(0)
    s = sched(num_blocks=14, max_num_batched_tokens=24)
    systems = {k: [rng.randrange(1000) for _ in range(rng.randrange(BS, 4 * BS))] for k in range(3)}
    adapters = [None, "A@1", "B@1"]
    made = 0
    preempted: list[Request] = []
    for step_no in range(400):
        if rng.random() < 0.4 and made < 150:
            sys_prompt = systems[rng.randrange(3)]
            tail = [rng.randrange(1000) for _ in range(rng.randrange(1, 2 * BS))]
            r = plain(f"r{made}", sys_prompt + tail, adapter=rng.choice(adapters),
                      salt=rng.choice([None, None, "s"]))
            r.sampling = SamplingParams(max_tokens=rng.randrange(1, 24))
            s.add(r)
            made += 1
        if rng.random() < 0.05 and s.running:
            s.finish(rng.choice(s.running), "abort")
        if rng.random() < 0.02:
            s.reset_prefix_cache()
        run_step(s, preempted)
    while s.has_unfinished():
        run_step(s, preempted)
    s.blocks.check([])
    assert s.blocks.num_free == s.blocks.num_blocks
    assert sum(s.prefix_cache.hits.values()) > 0 and len(preempted) > 5
