"""BlockManager and Scheduler, driven by hand: no model, no torch work, each test runs in milliseconds."""

from __future__ import annotations

import random

import pytest

from collections.abc import Callable, Hashable

from loraplex.adapters.slots import SlotGrant, SlotTable
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.request import Request, RequestStatus
from loraplex.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.sampling import SamplingParams

FAKE_TOKEN = 7


class Slots:
    """The scheduler's view of adapters (scheduler.AdapterSlots; the AdapterManager in the engine): a slot table,
    every adapter loaded unless `ready` says otherwise."""

    def __init__(self, num_slots: int, ready: Callable[[Hashable], bool] = lambda key: True) -> None:
        self.table: SlotTable[Hashable] = SlotTable(num_slots)
        self._ready = ready

    def ready(self, key: Hashable) -> bool:
        return self._ready(key)

    def can_take_slot(self, key: Hashable) -> bool:
        return self.table.can_acquire(key)

    def take_slot(self, key: Hashable) -> SlotGrant | None:
        return self.table.acquire(key)

    def release_slot(self, key: Hashable) -> None:
        self.table.release(key)


def make_req(rid: str, prompt_len: int, max_tokens: int = 4, adapter: str | None = None) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), adapter, arrival=0.0)


def make_sched(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
               max_loras: int = 2, max_skips: int = 2) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), Slots(max_loras), max_num_seqs,
                     max_num_batched_tokens, max_skips)


def check_invariants(s: Scheduler) -> None:
    """Bookkeeping that must hold between steps, whatever happened."""
    assert len(s.running) <= s.max_num_seqs
    held = [b for r in s.running for b in r.block_ids]
    assert len(held) == len(set(held)), "a KV block is owned by two requests"
    assert s.blocks.num_free + len(held) == s.blocks.num_blocks, "KV blocks leaked or double-freed"
    assert set(held).isdisjoint(s.blocks._free)
    for r in s.running:
        assert r.status is RequestStatus.RUNNING
        assert len(r.block_ids) >= s.blocks.blocks_for(r.num_computed_tokens)
        if r.adapter is not None:
            assert r.lora_slot == s.adapters.table.slot_of[r.adapter]
    for r in s.waiting:
        assert r.status is RequestStatus.WAITING and r.block_ids == [] and r.lora_slot == -1
    adapters = [r.adapter for r in s.running if r.adapter is not None]
    assert len(set(adapters)) <= s.adapters.table.num_slots
    assert s.adapters.table.refs == {a: adapters.count(a) for a in set(adapters)}


def step(s: Scheduler) -> SchedulerOutput:
    """One engine step by hand: schedule, advance computed tokens, sample a fake token at a request's end, finish."""
    out = s.schedule()
    assert sum(q.num_tokens for q in out.seqs) <= s.max_num_batched_tokens
    assert len({id(q.request) for q in out.seqs}) == len(out.seqs)
    for q in out.seqs:
        req = q.request
        assert q.num_tokens >= 1 and req.status is RequestStatus.RUNNING
        assert len(req.block_ids) >= s.blocks.blocks_for(req.num_computed_tokens + q.num_tokens)
        req.num_computed_tokens += q.num_tokens
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(FAKE_TOKEN)
            if len(req.output_token_ids) >= req.sampling.max_tokens:
                s.finish(req, "length")
    check_invariants(s)
    return out


def sched_map(out: SchedulerOutput) -> dict[str, int]:
    return {q.request.request_id: q.num_tokens for q in out.seqs}


# ---- BlockManager -------------------------------------------------------------------------------


def test_block_manager_allocates_ceil_blocks_and_grows_incrementally() -> None:
    """allocate() gives ceil(tokens / block_size) blocks in total, only adding the missing ones."""
    bm = BlockManager(num_blocks=10, block_size=4)
    r = make_req("a", 5)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    bm.allocate(r, 5)
    assert len(r.block_ids) == 2 and bm.num_free == 8
    first = list(r.block_ids)
    bm.allocate(r, 8)  # still fits in 2 blocks
    assert r.block_ids == first and bm.blocks_needed(r, 8) == 0
    assert bm.blocks_needed(r, 9) == 1
    bm.allocate(r, 9)
    assert r.block_ids[:2] == first and len(r.block_ids) == 3 and bm.num_free == 7


def test_block_manager_free_returns_blocks_and_they_are_reused() -> None:
    """Blocks are unique across requests; free() empties the request's list and makes its blocks available again."""
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_req("a", 4), make_req("b", 4)
    bm.allocate(a, 4)
    bm.allocate(b, 4)
    assert set(a.block_ids).isdisjoint(b.block_ids) and set(a.block_ids + b.block_ids) == {0, 1, 2, 3}
    assert bm.num_free == 0 and not bm.can_allocate(1) and bm.can_allocate(0)
    freed = set(a.block_ids)
    bm.free(a)
    assert a.block_ids == [] and bm.num_free == 2 and bm.can_allocate(2) and not bm.can_allocate(3)
    c = make_req("c", 3)
    bm.allocate(c, 3)
    assert set(c.block_ids) == freed and bm.num_free == 0


# ---- continuous batching & chunked prefill --------------------------------------------------------


def test_continuous_batching_requests_join_and_leave_each_step() -> None:
    """A finished request leaves the batch at once and a new one joins the next step while others keep going."""
    s = make_sched()
    a, b = make_req("a", 3, max_tokens=2), make_req("b", 2, max_tokens=5)
    s.add(a)
    s.add(b)
    assert sched_map(step(s)) == {"a": 3, "b": 2}  # both prefill together
    assert sched_map(step(s)) == {"a": 1, "b": 1}  # both decode; a reaches max_tokens=2
    assert a.finished and a.finish_reason == "length" and a not in s.running and a.block_ids == []
    c = make_req("c", 4, max_tokens=2)
    s.add(c)
    assert sched_map(step(s)) == {"b": 1, "c": 4}  # a gone, c joins mid-flight next to b's decode
    assert sched_map(step(s)) == {"b": 1, "c": 1}
    assert c.finished and not b.finished
    assert sched_map(step(s)) == {"b": 1}
    assert b.finished and b.output_token_ids == [FAKE_TOKEN] * 5
    assert not s.has_unfinished() and s.blocks.num_free == s.blocks.num_blocks


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget() -> None:
    """A prompt longer than max_num_batched_tokens is split over steps, then decodes one token per step."""
    s = make_sched(max_num_batched_tokens=8)
    r = make_req("r", 20, max_tokens=3)
    s.add(r)
    chunks = [sched_map(step(s))["r"] for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert r.num_computed_tokens == 20 and r.output_token_ids == [FAKE_TOKEN]  # token sampled only at the end
    assert sched_map(step(s)) == {"r": 1}


def test_chunked_prefill_does_not_stall_running_decodes() -> None:
    """While a long prompt is prefilled in chunks, each running decode still gets its one token every step."""
    s = make_sched(max_num_batched_tokens=8)
    d1, d2 = make_req("d1", 3, max_tokens=50), make_req("d2", 2, max_tokens=50)
    s.add(d1)
    s.add(d2)
    step(s)
    long = make_req("long", 30, max_tokens=2)
    s.add(long)
    chunks = []
    while long.num_computed_tokens < 30:
        m = sched_map(step(s))
        assert m["d1"] == 1 and m["d2"] == 1
        assert sum(m.values()) <= 8
        chunks.append(m["long"])
    assert chunks == [6, 6, 6, 6, 6]  # budget 8 minus the two decodes
    assert sched_map(step(s)) == {"d1": 1, "d2": 1, "long": 1}


# ---- KV admission control & preemption ------------------------------------------------------------


def test_admission_waits_for_kv_blocks_without_raising() -> None:
    """With the KV cache full, a new request stays waiting (no blocks, no error) and is admitted once blocks free."""
    # 5 blocks of 4 tokens; prompt 5 + 3 outputs computes at most 7 tokens = 2 blocks: no decode ever needs a 3rd.
    s = make_sched(num_blocks=5, block_size=4)
    a, b, c = (make_req(x, 5, max_tokens=3) for x in "abc")
    small = make_req("small", 1, max_tokens=1)
    for r in (a, b, c, small):
        s.add(r)
    assert sched_map(step(s)) == {"a": 5, "b": 5}
    assert s.blocks.num_free == 1  # enough for small, but c (2 blocks) came first
    for _ in range(2):
        assert list(s.waiting) == [c, small] and c.block_ids == []
        out = step(s)
        assert sched_map(out) == {"a": 1, "b": 1} and out.preempted == []
    assert a.finished and b.finished and s.blocks.num_free == 5
    assert sched_map(step(s)) == {"c": 5, "small": 1}  # first-come first-served: small never jumped ahead of c


def test_decode_needing_a_block_preempts_the_newest_running_request() -> None:
    """When a decode needs a block and none is free, the newest running request is preempted: blocks freed,
    num_computed_tokens reset, put at the front of waiting; it is recomputed (prompt + outputs) later."""
    s = make_sched(num_blocks=4, block_size=4)
    a, b = make_req("a", 8, max_tokens=2), make_req("b", 8, max_tokens=4)
    s.add(a)
    s.add(b)
    assert sched_map(step(s)) == {"a": 8, "b": 8}  # 4 blocks used; both sampled one token
    late = make_req("late", 2, max_tokens=1)
    s.add(late)
    out = step(s)  # a's decode at position 8 needs a 3rd block
    assert out.preempted == [b]
    assert sched_map(out) == {"a": 1}  # nothing admitted in a step that preempted
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.output_token_ids == [FAKE_TOKEN]  # generated tokens are kept and recomputed
    assert list(s.waiting) == [b, late]  # front of the queue, ahead of requests that arrived earlier
    assert a.finished
    out = step(s)
    assert sched_map(out) == {"b": 9, "late": 2}  # recompute 8 prompt + 1 output token
    assert len(b.output_token_ids) == 2


def test_newest_request_preempts_itself_when_it_needs_a_block() -> None:
    """If the request needing a block is itself the newest, it is the one preempted; older ones still run."""
    s = make_sched(num_blocks=4, block_size=4)
    a, b = make_req("a", 5, max_tokens=3), make_req("b", 8, max_tokens=3)
    s.add(a)
    s.add(b)
    step(s)
    out = step(s)  # a fits in its 2 blocks; b at position 8 needs a 3rd
    assert out.preempted == [b] and sched_map(out) == {"a": 1}
    assert list(s.waiting) == [b] and b.num_computed_tokens == 0
    while not a.finished:
        step(s)
    out = step(s)
    assert sched_map(out) == {"b": 9}


def test_multiple_preemptions_keep_arrival_order_in_waiting() -> None:
    """Two preemptions in one step leave the victims at the front of waiting in their original arrival order."""
    s = make_sched(num_blocks=5, block_size=2)
    a, b, c, d = make_req("a", 4, 9), make_req("b", 2, 9), make_req("c", 2, 9), make_req("d", 2, 9)
    for r in (a, b, c, d):
        s.add(r)
    assert sched_map(step(s)) == {"a": 4, "b": 2, "c": 2, "d": 2}  # all 5 blocks in use
    e = make_req("e", 1, 1)
    s.add(e)
    out = step(s)  # a@4 needs a block -> d preempted; b@2 needs a block -> c preempted
    assert out.preempted == [d, c]
    assert sched_map(out) == {"a": 1, "b": 1}
    assert list(s.waiting) == [c, d, e]
    assert all(r.num_computed_tokens == 0 and r.block_ids == [] for r in (c, d))


# ---- limits: max_num_seqs and adapter slots -------------------------------------------------------


def test_max_num_seqs_is_respected() -> None:
    """Never more than max_num_seqs requests run; the next waiting one joins as soon as one finishes."""
    s = make_sched(max_num_seqs=2)
    reqs = [make_req(f"r{i}", 2, max_tokens=2 + i) for i in range(5)]
    for r in reqs:
        s.add(r)
    assert sched_map(step(s)) == {"r0": 2, "r1": 2}
    assert sched_map(step(s)) == {"r0": 1, "r1": 1}  # r0 finishes here
    assert sched_map(step(s)) == {"r1": 1, "r2": 2}  # r1 finishes here
    assert sched_map(step(s)) == {"r2": 1, "r3": 2}
    while s.has_unfinished():
        assert len(step(s).seqs) <= 2
    assert all(r.finished for r in reqs)


def test_at_most_max_loras_distinct_adapters_run_at_once() -> None:
    """With 2 slots, a third adapter waits while two others run; a request for a resident adapter shares its slot."""
    s = make_sched(max_loras=2, max_skips=10)
    a, b, c = make_req("a", 2, 3, "A"), make_req("b", 2, 3, "B"), make_req("c", 2, 3, "C")
    a2 = make_req("a2", 2, 3, "A")
    for r in (a, b, c, a2):
        s.add(r)
    out = step(s)
    assert sched_map(out) == {"a": 2, "b": 2, "a2": 2}  # c needs a 3rd slot; a2 reuses A's
    assert sorted(out.slot_loads) == sorted([(a.lora_slot, "A"), (b.lora_slot, "B")])  # A copied once
    assert a.lora_slot == a2.lora_slot != b.lora_slot
    assert list(s.waiting) == [c] and c.times_passed_over == 1
    step(s)
    step(s)  # a, b, a2 finish
    out = step(s)
    assert sched_map(out) == {"c": 2}
    assert out.slot_loads == [(c.lora_slot, "C")] and s.adapters.table.evictions == 1


def test_resident_idle_adapter_is_reused_without_a_load() -> None:
    """An adapter whose slot is idle but still resident is reused by a later request without a new slot load."""
    s = make_sched(max_loras=2)
    first = make_req("first", 2, 1, "A")
    s.add(first)
    out = step(s)
    slot = s.adapters.table.slot_of["A"]
    assert out.slot_loads == [(slot, "A")] and first.finished and first.lora_slot == -1
    assert s.adapters.table.refs == {} and s.adapters.table.resident() == ["A"]
    again = make_req("again", 2, 1, "A")
    s.add(again)
    out = s.schedule()
    assert sched_map(out) == {"again": 2} and out.slot_loads == [] and again.lora_slot == slot


def test_base_model_requests_need_no_adapter_slot() -> None:
    """Requests without an adapter are admitted even when every adapter slot is busy."""
    s = make_sched(max_loras=1, max_skips=0)
    s.add(make_req("a", 2, 5, "A"))
    s.add(make_req("base", 2, 5, None))
    assert sched_map(step(s)) == {"a": 2, "base": 2}
    assert s.adapters.table.refs == {"A": 1}


# ---- fairness bound ----------------------------------------------------------------------------------


def admitted_in(out: SchedulerOutput, order: list[str]) -> None:
    """Append newly scheduled request ids to `order` (out.seqs lists running requests first, then admissions)."""
    for q in out.seqs:
        if q.request.request_id not in order:
            order.append(q.request.request_id)


def _holder_and_starved(s: Scheduler, holder_tokens: int) -> tuple[Request, Request, list[str]]:
    """Adapter A's request takes the only slot; then x arrives for adapter B and must wait for it."""
    order: list[str] = []
    holder = make_req("holder", 2, max_tokens=holder_tokens, adapter="A")
    s.add(holder)
    admitted_in(step(s), order)
    x = make_req("x", 2, max_tokens=2, adapter="B")
    s.add(x)
    return holder, x, order


@pytest.mark.parametrize("max_skips", [0, 1, 2, 3])
def test_fairness_bound_when_later_requests_arrive_together(max_skips: int) -> None:
    """A request whose adapter has no slot is overtaken by at most max_skips later requests, even when they
    are all waiting in the same step, and is admitted (before the rest) once a slot frees."""
    s = make_sched(max_loras=1, max_skips=max_skips, max_num_seqs=16)
    holder, x, order = _holder_and_starved(s, holder_tokens=4)
    for i in range(6):
        s.add(make_req(f"l{i}", 2, max_tokens=50))
    while x.status is RequestStatus.WAITING:
        admitted_in(step(s), order)
    assert order[: order.index("x") + 1] == ["holder"] + [f"l{i}" for i in range(max_skips)] + ["x"]
    assert x.times_passed_over == max_skips
    assert holder.finished  # x got in only because holder's slot became free
    assert s.adapters.table.slot_of == {"B": x.lora_slot}


def test_fairness_bound_when_later_requests_arrive_one_per_step() -> None:
    """Later requests trickling in one per step overtake a slot-starved request at most max_skips times;
    it is then admitted ahead of everything that arrived after it once the slot frees."""
    s = make_sched(max_loras=1, max_skips=2, max_num_seqs=16)
    holder, x, order = _holder_and_starved(s, holder_tokens=8)
    i = 0
    while x.status is RequestStatus.WAITING:
        adapter = "A" if i == 1 else None  # l1 shares the busy slot: it may overtake too
        s.add(make_req(f"l{i}", 2, max_tokens=3 if adapter else 50, adapter=adapter))
        i += 1
        admitted_in(step(s), order)
    assert i > 4  # x really waited several steps with newcomers queued behind it
    assert order[:4] == ["holder", "l0", "l1", "x"] and x.times_passed_over == 2


def test_passed_over_count_only_grows_when_someone_overtakes() -> None:
    """Steps in which nobody is admitted past a slot-starved request do not count against the bound."""
    s = make_sched(max_loras=1, max_skips=1)
    holder = make_req("holder", 2, max_tokens=5, adapter="A")
    s.add(holder)
    step(s)
    x = make_req("x", 2, max_tokens=1, adapter="B")
    s.add(x)
    for _ in range(3):
        step(s)
        assert x.status is RequestStatus.WAITING and x.times_passed_over == 0
    s.add(make_req("l0", 2, max_tokens=9))
    s.add(make_req("l1", 2, max_tokens=9))
    out = step(s)
    assert [q.request.request_id for q in out.seqs] == ["holder", "l0"] and x.times_passed_over == 1


# ---- finish / abort ---------------------------------------------------------------------------------


def test_finish_waiting_and_running_requests_releases_everything() -> None:
    """finish() on a waiting request removes it from the queue; on a running one it frees its blocks and slot ref."""
    s = make_sched(max_loras=1)
    run, wait = make_req("run", 6, 9, "A"), make_req("wait", 2, 9, "B")
    s.add(run)
    s.add(wait)
    step(s)
    assert run.block_ids and s.adapters.table.refs == {"A": 1} and list(s.waiting) == [wait]
    s.finish(wait, "abort")
    assert not s.waiting and wait.finished and wait.finish_reason == "abort"
    s.finish(run, "abort")
    assert not s.running and run.block_ids == [] and run.lora_slot == -1 and s.adapters.table.refs == {}
    assert s.blocks.num_free == s.blocks.num_blocks and s.adapters.table.resident() == ["A"]  # kept for reuse
    assert not s.has_unfinished() and s.schedule().seqs == []


# ---- randomized end-to-end simulation ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_completes_with_invariants(seed: int) -> None:
    """Random arrivals, prompt lengths and adapters under tight KV/slot limits: every request completes with
    exactly max_tokens outputs, invariants hold every step, running decodes are never skipped, nothing leaks."""
    rng = random.Random(seed)
    s = make_sched(num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=10, max_loras=2, max_skips=3)
    pending = []
    for i in range(30):
        prompt = rng.randint(1, 25)
        max_tokens = rng.randint(1, 48 - prompt)  # always fits the 48-token cache alone
        adapter = rng.choice([None, "A", "B", "C", "D"])
        pending.append(make_req(f"r{i}", prompt, max_tokens, adapter))
    all_reqs = list(pending)
    for t in range(2000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if pending:
                s.add(pending.pop(0))
        decoding = [r for r in s.running if r.num_tokens - r.num_computed_tokens == 1]
        out = step(s)
        got = {id(q.request): q.num_tokens for q in out.seqs}
        for r in decoding:
            assert got.get(id(r)) == 1 or r in out.preempted, "a running decode was skipped"
        for r in out.preempted:
            assert r.num_computed_tokens == 0 and r.block_ids == [] and id(r) not in got
        if not pending and not s.has_unfinished():
            break
    else:
        pytest.fail("workload did not finish")
    for r in all_reqs:
        assert r.finished and len(r.output_token_ids) == r.sampling.max_tokens
    assert s.blocks.num_free == s.blocks.num_blocks and s.adapters.table.refs == {}
    assert max(r.times_passed_over for r in all_reqs) <= 3


def test_request_whose_adapter_is_still_loading_waits_without_blocking_others() -> None:
    """An adapter not ready yet: the request stays waiting (no slot, no skip counted) while later ones run; then it runs."""
    ready: set[str] = set()
    s = Scheduler(BlockManager(64, 4), Slots(2, ready=lambda k: k in ready), 8, 64, max_skips=0)
    loading, other = make_req("loading", 2, 2, "A"), make_req("other", 2, 2, None)
    s.add(loading)
    s.add(other)
    out = step(s)
    assert sched_map(out) == {"other": 2} and out.slot_loads == []
    assert list(s.waiting) == [loading] and loading.times_passed_over == 0 and s.adapters.table.resident() == []
    ready.add("A")
    out = step(s)
    assert sched_map(out) == {"other": 1, "loading": 2} and out.slot_loads == [(loading.lora_slot, "A")]
