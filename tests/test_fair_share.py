"""Weighted fair sharing between tenants in the scheduler (engine/fair_share.py), driven by hand like
tests/test_scheduler.py: no model, no torch, milliseconds. Shares are of decode tokens while tenants are backlogged."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Hashable

import pytest

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.request import Request, RequestStatus
from loraplex.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.sampling import SamplingParams
from test_scheduler import FAKE_TOKEN, Slots, check_invariants

Tenant = Hashable


def req(rid: str, tenant: Tenant, prompt: int = 4, max_tokens: int = 8, weight: float = 1.0) -> Request:
    return Request(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens), None, arrival=0.0,
                   tenant=tenant, weight=weight)


def sched(max_num_seqs: int = 8, num_blocks: int = 4096, block_size: int = 4, budget: int = 256,
          fair_steps: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), Slots(2), max_num_seqs, budget, max_skips=2,
                     fair_steps=fair_steps)


def run_step(s: Scheduler, decoded: Counter[Tenant], owner: Callable[[Request], Tenant] = lambda r: r.tenant
             ) -> tuple[SchedulerOutput, list[Request]]:
    """One step by hand (as test_scheduler.step), counting decode tokens by `owner` (the tenant); returns the
    scheduler's output and the requests finished."""
    out = s.schedule()
    done = []
    for q in out.seqs:
        r = q.request
        if r.num_computed_tokens >= len(r.prompt_token_ids):
            decoded[owner(r)] += q.num_tokens
        r.num_computed_tokens += q.num_tokens
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(FAKE_TOKEN)
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                s.finish(r, "length")
                done.append(r)
    check_invariants(s)
    return out, done


def flood(s: Scheduler, weights: dict[Tenant, float], steps: int, backlog: int = 12, seed: int = 0,
          fcfs_first: Tenant | None = None) -> Counter[Tenant]:
    """Every tenant keeps `backlog` requests waiting (lengths drawn alike for all) for `steps` steps; the decode
    tokens each got. `fcfs_first`: that tenant's whole backlog arrives before anyone else's."""
    rng = random.Random(seed)
    n = 0

    def add(t: Tenant) -> None:
        nonlocal n
        s.add(req(f"{t}-{n}", t, prompt=rng.randint(1, 12), max_tokens=rng.randint(4, 40), weight=weights[t]))
        n += 1

    order = sorted(weights, key=lambda t: t != fcfs_first)
    for t in order:
        for _ in range(backlog):
            add(t)
    decoded: Counter[Tenant] = Counter()
    for _ in range(steps):
        for r in run_step(s, decoded)[1]:
            add(r.tenant)  # keep every tenant backlogged
    return decoded


@pytest.mark.parametrize("tenants", [2, 4, 8])
def test_backlogged_tenants_get_equal_shares(tenants: int) -> None:
    decoded = flood(sched(max_num_seqs=16), {f"t{i}": 1.0 for i in range(tenants)}, steps=3000)
    mean = sum(decoded.values()) / tenants
    assert all(abs(v - mean) <= 0.05 * mean for v in decoded.values()), decoded


def test_weight_three_gets_three_times_weight_one() -> None:
    decoded = flood(sched(max_num_seqs=16), {"a": 1.0, "b": 1.0, "c": 1.0, "heavy": 3.0}, steps=3000)
    unit = (decoded["a"] + decoded["b"] + decoded["c"]) / 3
    assert all(abs(decoded[t] - unit) <= 0.05 * unit for t in "abc"), decoded
    assert abs(decoded["heavy"] / unit - 3.0) <= 0.15, decoded  # 3 within ±5%


def test_first_come_first_served_within_one_tenant_is_unfair_between_two() -> None:
    """The same flood with every request one tenant's (the order before fair sharing): the tenant whose backlog
    came first takes the batch; with two tenants, the other gets its half from the start."""
    one = Counter[Tenant]()
    s = sched(max_num_seqs=8)
    for i in range(40):  # a's backlog, then b's, as one tenant
        s.add(req(f"x{i}", None, max_tokens=30))
    for _ in range(60):
        run_step(s, one, owner=lambda r: "a" if int(r.request_id[1:]) < 20 else "b")
    assert one["b"] == 0
    fair = flood(sched(max_num_seqs=8), {"a": 1.0, "b": 1.0}, steps=60, backlog=20, fcfs_first="a")
    assert abs(fair["a"] - fair["b"]) <= 0.05 * fair["a"], fair


def test_a_new_tenant_is_admitted_in_the_next_step() -> None:
    """One tenant fills the batch and keeps a backlog; another's single request runs at the very next step, taking
    the place of the flooding tenant's newest request (which waits at the front of its tenant's queue)."""
    s = sched(max_num_seqs=4)
    for i in range(10):
        s.add(req(f"n{i}", "flood", max_tokens=1000))
    decoded: Counter[Tenant] = Counter()
    for _ in range(5):
        run_step(s, decoded)
    assert len(s.running) == 4 and all(r.tenant == "flood" for r in s.running)
    quiet = req("q", "quiet", max_tokens=3)
    s.add(quiet)
    out = s.schedule()
    assert quiet.status is RequestStatus.RUNNING and any(q.request is quiet for q in out.seqs)
    [victim] = out.preempted
    assert victim.request_id == "n3" and s.waiting[0] is victim and victim.num_computed_tokens == 0


def flooding(requests: int, steps: int = 1, max_num_seqs: int = 8, fair_steps: bool = True) -> Scheduler:
    """A scheduler whose batch one tenant ("flood") fills with `requests` long requests, after `steps` steps."""
    s = sched(max_num_seqs=max_num_seqs, fair_steps=fair_steps)
    for i in range(requests):
        s.add(req(f"n{i}", "flood", max_tokens=1000))
    for _ in range(steps):
        run_step(s, Counter())
    return s


def test_a_tenant_below_its_share_is_not_held_until_a_request_finishes() -> None:
    """The flood's requests started together and end together, hundreds of steps away; the quiet tenant, one request
    already running, gets its second into the batch at the next step all the same: it is below its share (half)."""
    s = flooding(20)
    s.add(req("q1", "quiet", max_tokens=500))
    run_step(s, Counter())
    q2 = req("q2", "quiet", max_tokens=500)
    s.add(q2)
    out, _ = run_step(s, Counter())
    assert q2.status is RequestStatus.RUNNING and [r.tenant for r in out.preempted] == ["flood"]
    # Up to its share, then no more: the quiet tenant's backlog takes places one a step until it holds half.
    for i in range(3, 12):
        s.add(req(f"q{i}", "quiet", max_tokens=500))
    preempted = [len(run_step(s, Counter())[0].preempted) for _ in range(12)]
    assert Counter(r.tenant for r in s.running) == {"flood": 4, "quiet": 4}
    assert preempted[:2] == [1, 1] and sum(preempted[-8:]) == 0, preempted  # settled: no swapping back and forth


def test_a_first_token_far_under_its_share_takes_a_step_of_its_own() -> None:
    """Beside a full batch of another tenant's decodes, a quiet tenant's first token is computed in a step of its own
    prompt (a step's time grows with its tokens), and the flood's decodes wait that one step, never two in a row."""
    s = flooding(20, steps=3)
    q = req("q", "quiet", prompt=5, max_tokens=3)
    s.add(q)
    out, _ = run_step(s, Counter())
    assert [(x.request.request_id, x.num_tokens) for x in out.seqs] == [("q", 5)]
    assert len(q.output_token_ids) == 1  # its first token
    out, _ = run_step(s, Counter())  # everyone else's decodes, and the quiet one's second token
    assert {x.request.tenant for x in out.seqs} == {"flood", "quiet"} and len(out.seqs) == 8
    q2, q3 = req("q2", "quiet", max_tokens=3), req("q3", "quiet", max_tokens=3)
    s.add(q2)
    assert len(run_step(s, Counter())[0].seqs) == 1  # q2 alone
    s.add(q3)  # arrives right after a first-token step: this step is everyone's, q3 among them
    out, _ = run_step(s, Counter())
    assert q3 in [x.request for x in out.seqs] and len(out.seqs) == 8


def test_without_fair_steps_every_step_is_everyones() -> None:
    """fair_steps=False (a GPU, or --fair-steps off): the quiet first token shares the flood's step."""
    s = flooding(20, fair_steps=False)
    q = req("q", "quiet", prompt=5, max_tokens=3)
    s.add(q)
    out, _ = run_step(s, Counter())
    assert len(out.seqs) == 8 and q in [x.request for x in out.seqs]


def test_no_first_token_step_for_a_tenant_at_its_share_or_a_prompt_longer_than_the_rest() -> None:
    """Tenants running alike share every step; a prompt whose tokens outnumber the others' takes no step of its own
    (it would save it little and hold the others up)."""
    s = sched(max_num_seqs=8)
    for t in "ab":
        for i in range(4):
            s.add(req(f"{t}{i}", t, max_tokens=1000))
    run_step(s, Counter())
    s.finish(s.running[-1], "abort")  # b holds 3 places, a 4: b's newcomer is not far under a
    s.add(req("b9", "b", max_tokens=5))
    out, _ = run_step(s, Counter())
    assert len(out.seqs) == 8
    s = flooding(6)
    long = req("long", "quiet", prompt=40, max_tokens=3)
    s.add(long)
    out, _ = run_step(s, Counter())
    assert len(out.seqs) == 7 and long in [x.request for x in out.seqs]


def prompt_tokens(out: SchedulerOutput) -> int:
    return sum(x.num_tokens for x in out.seqs if x.num_tokens > 1)


def test_a_tenant_over_its_share_adds_a_batch_of_prompt_tokens_to_a_step_while_others_run() -> None:
    """A wave of the flood's new requests (long prompts) is prefilled max_num_seqs tokens a step while the quiet tenant
    runs, so the quiet tenant's decode waits for steps of at most two batches' worth of tokens; alone, the flood takes
    the whole budget again."""
    s = sched(max_num_seqs=16, budget=256)
    quiet = req("q", "quiet", max_tokens=30)
    s.add(quiet)
    for i in range(10):
        s.add(req(f"n{i}", "flood", max_tokens=1000))
    for _ in range(3):
        run_step(s, Counter())
    for i in range(6):
        s.add(req(f"w{i}", "flood", prompt=100, max_tokens=1000))
    steps = []
    while not quiet.finished:
        out, _ = run_step(s, Counter())
        steps.append((prompt_tokens(out), quiet in [x.request for x in out.seqs]))
    assert all(p <= 16 for p, _ in steps) and all(ran for _, ran in steps), steps
    assert sum(p for p, _ in steps) >= 16 * 20  # the wave kept moving, a batch's worth every step
    out, _ = run_step(s, Counter())  # the quiet tenant is gone: the flood is alone, the budget all its own
    assert prompt_tokens(out) > 16
    s = flooding(10, max_num_seqs=16, fair_steps=False)  # off: the wave takes the budget beside the quiet one too
    s.add(req("q", "quiet", max_tokens=30))
    run_step(s, Counter())
    for i in range(6):
        s.add(req(f"w{i}", "flood", prompt=100, max_tokens=1000))
    assert prompt_tokens(run_step(s, Counter())[0]) > 16


def test_newcomers_every_step_still_let_every_request_run_every_other_step() -> None:
    """A new tenant in every step (each far under the flood's share) cannot stall the flood: first-token steps never
    come two in a row, so each running request computes at least every other step (those the newcomers' places were
    taken from wait at the front of the flood's queue)."""
    s = flooding(60, max_num_seqs=32)
    computed: list[set[str]] = []
    preempted: set[str] = set()
    own = 0
    for step_no in range(40):
        s.add(req(f"q{step_no}", f"quiet{step_no}", max_tokens=2))
        out, _ = run_step(s, Counter())
        own += all(x.request.tenant != "flood" for x in out.seqs)
        computed.append({x.request.request_id for x in out.seqs})
        preempted |= {r.request_id for r in out.preempted}
    assert own == 20  # every other step
    kept = [r.request_id for r in s.running if r.tenant == "flood" and r.request_id not in preempted]
    assert len(kept) > 20
    for a, b in zip(computed, computed[1:]):
        assert all(r in a | b for r in kept)


def test_no_shaped_steps_while_every_request_has_its_place() -> None:
    """Nothing waits and the batch has room: a light tenant's first token shares the step (a step of a few decodes is
    short) and a long prompt of a tenant with more requests is not held back."""
    s = sched(max_num_seqs=64, budget=256)
    for i in range(10):
        s.add(req(f"a{i}", "a", max_tokens=1000))
    s.add(req("b0", "b", max_tokens=1000))
    run_step(s, Counter())
    s.add(req("b1", "b", prompt=5, max_tokens=3))
    assert len(run_step(s, Counter())[0].seqs) == 12
    s.add(req("long", "a", prompt=200, max_tokens=3))
    assert prompt_tokens(run_step(s, Counter())[0]) == 200


def test_no_preemption_when_the_newcomer_would_take_more_than_its_share() -> None:
    """Two tenants each with one request in a batch of two: a third tenant waits for a place; nobody is evicted."""
    s = sched(max_num_seqs=2)
    s.add(req("a", "A", max_tokens=50))
    s.add(req("b", "B", max_tokens=50))
    run_step(s, Counter())
    c = req("c", "C", max_tokens=2)
    s.add(c)
    out = s.schedule()
    assert out.preempted == [] and c.status is RequestStatus.WAITING


def test_kv_preemption_takes_from_the_tenant_furthest_over_its_share() -> None:
    """Out of KV blocks, the victim is the newest request of the tenant with the most running, not the newest of
    all; nobody starves: every request finishes."""
    s = sched(max_num_seqs=8, num_blocks=12, block_size=4, budget=64)
    big = [req(f"big{i}", "big", prompt=4, max_tokens=12) for i in range(3)]
    small = req("small", "small", prompt=4, max_tokens=12)
    for r in (*big[:2], small, big[2]):
        s.add(r)
    preempted: list[str] = []
    while s.has_unfinished():
        preempted += [r.request_id for r in run_step(s, Counter())[0].preempted]
    assert preempted and all(p.startswith("big") for p in preempted), preempted
    assert all(r.finished for r in (*big, small))


def test_the_books_hold_under_abort() -> None:
    """Aborting waiting and running requests of a tenant mid-flood leaves no trace: its service is forgotten once it
    has nothing left, the others share the batch, and the block and slot books balance (check_invariants)."""
    s = sched(max_num_seqs=6)
    decoded: Counter[Tenant] = Counter()
    for i in range(12):
        for t in "abc":
            s.add(req(f"{t}{i}", t, max_tokens=20))
    for _ in range(10):
        run_step(s, decoded)
    for r in [r for r in [*s.running, *s.waiting] if r.tenant == "c"]:
        s.finish(r, "abort")
        s.finish(r, "abort")  # a second finish of the same request counts nothing twice
    run_step(s, decoded)
    assert "c" not in s.fair.service and {r.tenant for r in s.running} == {"a", "b"}
    assert Counter(r.tenant for r in s.running) == {"a": 3, "b": 3}
    # Each tenant's count of requests waiting or running is the scheduler's, kept as they come and go.
    assert s.fair.live == Counter(r.tenant for r in [*s.running, *s.waiting]) == {"a": 12, "b": 12}
    while s.has_unfinished():
        run_step(s, decoded)
    assert s.fair.service == {} and s.fair.live == {} and s.blocks.num_free == s.blocks.num_blocks


def test_priority_orders_a_tenants_own_requests_only() -> None:
    """vLLM's priority (lower first) orders the requests of one tenant; it buys nothing against another tenant."""
    s = sched(max_num_seqs=2)
    for rid, tenant, priority in (("a-late", "a", 5), ("a-urgent", "a", -9), ("a-mid", "a", 1),
                                  ("b-1", "b", 0), ("b-2", "b", 0)):
        r = req(rid, tenant, max_tokens=3)
        r.priority = priority
        s.add(r)
    order: list[str] = []
    while s.has_unfinished():
        out, _ = run_step(s, Counter())
        order += [q.request.request_id for q in out.seqs if q.request.num_computed_tokens == q.num_tokens]
    assert [r for r in order if r.startswith("a")] == ["a-urgent", "a-mid", "a-late"]
    assert order[:2] == ["a-urgent", "b-1"]  # one place each: a's urgent request does not take b's


def test_a_low_priority_request_is_preempted_first() -> None:
    s = sched(max_num_seqs=8)
    reqs = [req(f"r{i}", "a") for i in range(3)]
    reqs[0].priority = 7  # the oldest, but the least urgent
    for r in reqs:
        s.add(r)
    run_step(s, Counter())
    assert s.fair.victim(s.running, s.running) is reqs[0]
