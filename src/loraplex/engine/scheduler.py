"""Scheduler: iteration-level batching with chunked prefill, KV admission control and adapter slots. No torch.

Each step: running requests first (decodes, then unfinished prefills), each taking one token or a
prompt chunk from the step's token budget; then waiting requests are admitted while KV blocks,
sequence slots and adapter slots allow. Between tenants (engine/fair_share.py) places and prefill
budget go by weighted fair share; within a tenant, first-come first-served. A request
whose prompt starts with blocks in the prefix cache takes them and computes only the rest (admission
counts only the blocks it really needs). When a
decode needs a block and none is free, or the batch is full while a tenant waits below its share, the newest
running request of the tenant furthest over its share is preempted (its KV freed and recomputed later). On a CPU a
first token of a tenant far under its share may get a step of its own prompt (_express). A waiting
request whose adapter cannot get a slot is passed over by later requests at most `max_skips` times; after that
nobody is admitted ahead of it. A request whose adapter is still being read from disk simply waits: it holds nobody
up and loses no place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.adapters.slots import SlotGrant
from loraplex.engine.block_manager import BlockManager, namespace
from loraplex.engine.fair_share import FairShare
from loraplex.engine.request import Request, RequestStatus


class AdapterSlots(Protocol):
    """What the scheduler needs of adapters (adapters/holdings.py Holdings implements it): whether an
    adapter's weights are loaded, and a reference to its device slot."""

    def ready(self, key: Hashable) -> bool: ...

    def can_take_slot(self, key: Hashable) -> bool: ...

    def take_slot(self, key: Hashable) -> SlotGrant | None: ...

    def release_slot(self, key: Hashable) -> None: ...

    def digest(self, key: Hashable) -> bytes: ...  # of the loaded weights: part of the prefix cache's namespace


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens


@dataclass(slots=True)
class PrefixCacheCounters:
    """Prompt tokens looked up in the prefix cache at admission, and those found, per adapter name (None: base)."""

    queries: dict[str | None, int] = field(default_factory=dict)
    hits: dict[str | None, int] = field(default_factory=dict)

    def add(self, name: str | None, queried: int, hit: int) -> None:
        self.queries[name] = self.queries.get(name, 0) + queried
        self.hits[name] = self.hits.get(name, 0) + hit


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    slot_loads: list[tuple[int, Hashable]] = field(default_factory=list)  # (slot, adapter key) to fill before the step
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, adapters: AdapterSlots, max_num_seqs: int,
                 max_num_batched_tokens: int, max_skips: int, fair_steps: bool = False) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_skips = max_skips
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefix_cache = PrefixCacheCounters()
        self.fair = FairShare()
        # Steps shaped for the tenants below their share while the batch is contended (_contended), on a CPU, where a
        # step's time grows with its tokens: a first token far under its share gets a step of its own (_express); a
        # tenant over its share adds at most max_num_seqs prompt tokens to a step (_chunk).
        self.fair_steps = fair_steps
        self._expressed = False  # the last step was a first-token step
        self._capped: set[Hashable] = set()  # this step's tenants over their share
        self._prompt_room = 0  # prompt tokens they may still add to this step

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self.fair.joined(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str, keep_cached: bool = True) -> None:
        """keep_cached=False: the request failed in a step, so its K/V blocks never enter the prefix cache."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req, keep_cached)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        if req.status is not RequestStatus.FINISHED:
            self.fair.left(req)  # its tenant's last: its service is not kept (it rejoins at the virtual time)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def advance(self, seqs: list[ScheduledSeq]) -> None:
        """After a step: the scheduled tokens' K/V are computed; full blocks become findable in the prefix cache."""
        for s in seqs:
            s.request.num_computed_tokens += s.num_tokens
            self.blocks.commit(s.request)

    def _release(self, req: Request, keep_cached: bool = True) -> None:
        self.blocks.free(req, keep_cached)
        if req.adapter is not None and req.lora_slot >= 0:
            self.adapters.release_slot(req.adapter)
        req.lora_slot = -1

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0  # recompute prompt + generated tokens when readmitted
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._make_room(out)
        kv_preempted = len(out.preempted)
        self._capped = self.fair.over_share(self.running) if self.fair_steps and self._contended() else set()
        self._prompt_room = self.max_num_seqs
        scheduled: set[int] = set()
        for req in self.fair.prefill_order(self.running):  # decodes, then prefills by tenant share
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted to make room for one before it
            n = self._chunk(req, min(req.num_tokens - req.num_computed_tokens, budget))
            if n == 0:
                continue
            while not self.blocks.can_allocate(self.blocks.blocks_needed(req, req.num_computed_tokens + n)):
                unscheduled = [r for r in self.running if id(r) not in scheduled]  # req among them
                self._preempt(self.fair.victim(unscheduled, self.running), out)
                if req.status is not RequestStatus.RUNNING:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            self.blocks.allocate(req, req.num_computed_tokens + n)
            out.seqs.append(ScheduledSeq(req, n))
            scheduled.add(id(req))
            budget -= n
        if len(out.preempted) == kv_preempted:  # no decode needed a block: the KV cache has room to admit
            self._admit(out, budget)
        self._express(out)
        for s in out.seqs:
            self.fair.charge(s.request, s.num_tokens)
        return out

    def _make_room(self, out: SchedulerOutput) -> None:
        """While the batch is full, the waiting tenant furthest under its share (the first in admission order whose
        adapter can run now) takes the place of the newest request of the tenant furthest over its share, if the
        swap leaves the newcomer's tenant no more loaded than the victim's: a tenant below its share is never held
        behind another's backlog until some request happens to finish (a flood's requests, started together, end
        together), and the loads settle within one request of each other (no swap back and forth). One place a
        step, so the batch changes by at most one preemption per step."""
        if len(self.running) < self.max_num_seqs or not self.waiting:
            return
        runnable = (r for r in self.fair.admission_order(self.waiting, self.running)
                    if r.adapter is None or (self.adapters.ready(r.adapter) and self.adapters.can_take_slot(r.adapter)))
        head = next(runnable, None)
        if head is None:
            return
        load = self.fair.load(self.running)
        victim = self.fair.victim(self.running, self.running)
        keeps = load[victim.tenant] - 1.0 / victim.weight
        if load.get(head.tenant, 0.0) + 1.0 / head.weight > keeps:
            return  # the newcomer's tenant would then hold more than the victim's: already fair
        self._preempt(victim, out)  # the newcomer takes the place at admission, ahead of the victim's tenant

    def _contended(self) -> bool:
        """More requests than the batch has places: then steps are shaped (fair_steps). Otherwise every request has
        its place, a step of a few decodes is short, and a long prompt is not held back for nothing."""
        return len(self.running) + len(self.waiting) > self.max_num_seqs

    def _chunk(self, req: Request, n: int) -> int:
        """The tokens `req` computes this step of the `n` the budget allows. In a contended batch, a tenant over its
        share (FairShare.over_share: others run too) adds at most max_num_seqs prompt tokens to a step: its prefills
        (a wave of new requests, started together and ended together) would otherwise make a step several times a
        batch of decodes, and every other tenant's next token waits for it. So a step takes at most about two batches
        of decodes."""
        if req.tenant not in self._capped or n <= 1:
            return n
        n = min(n, self._prompt_room)
        self._prompt_room -= n
        return n

    def _express(self, out: SchedulerOutput) -> None:
        """In a contended batch, a first token of a tenant far under its share (FairShare.far_under) does not wait
        behind a step of the other tenants' tokens. A step's time grows with its tokens (on a CPU), so beside a full
        batch of another tenant's decodes a first token would take a step of the whole batch. When the other tokens
        are at least as many as those prompts', this step computes only the prompts (their chunks) of requests with
        no token yet of such tenants; the rest wait one step, never two in a row, so every request still runs at
        least every other step. The work is the same, in another order, plus one step's fixed cost: blocks already
        given to the requests that wait stay theirs for the next step."""
        if self._expressed or not self.fair_steps or not self._contended():
            self._expressed = False
            return
        under = self.fair.far_under(self.running)
        first = [s for s in out.seqs if s.request.tenant in under and not s.request.output_token_ids
                 and s.request.num_computed_tokens < len(s.request.prompt_token_ids)]
        if first and sum(s.num_tokens for s in out.seqs) >= 2 * sum(s.num_tokens for s in first):
            out.seqs = first
            self._expressed = True

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks `req` (waiting: nothing computed) can start from; sets its namespace once."""
        if not self.blocks.caching or req.sampling.prompt_logprobs is not None:
            return []  # prompt log-probabilities need the logits of every prompt position: computed in full
        if req.cache_namespace is None:
            digest = b"" if req.adapter is None else self.adapters.digest(req.adapter)
            req.cache_namespace = namespace(req.adapter, digest, req.cache_salt)
        return self.blocks.match(req)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (running requests keep theirs); returns how many were findable."""
        return self.blocks.reset()

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        passed: list[Request] = []
        for req in self.fair.admission_order(self.waiting, self.running):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if req.adapter is not None and not self.adapters.ready(req.adapter):
                continue  # still loading on the loader thread: wait without holding anyone up
            if req.adapter is not None and not self.adapters.can_take_slot(req.adapter):
                passed.append(req)
                if req.times_passed_over >= self.max_skips:
                    break  # fairness bound reached: nobody overtakes it any more
                continue
            cached = self._cached_prefix(req)
            start = len(cached) * self.blocks.block_size
            n = self._chunk(req, min(req.num_tokens - start, budget))
            if n == 0:
                continue  # its tenant, over its share, has added all the prompt tokens it may to this step
            need = self.blocks.blocks_for(start + n) - len(cached) + self.blocks.reclaimed_by(cached)
            if not self.blocks.can_allocate(need):
                break  # KV cache full: wait for running requests to free blocks
            if req.adapter is not None:
                grant = self.adapters.take_slot(req.adapter)
                assert grant is not None
                req.lora_slot = grant.slot
                if grant.needs_load:
                    out.slot_loads.append((grant.slot, req.adapter))
            for p in passed:  # every later request admitted counts, also several in one step
                p.times_passed_over += 1
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if self.blocks.caching:
                self.prefix_cache.add(req.adapter.name if req.adapter is not None else None, req.num_tokens, start)
                if not req.output_token_ids:
                    req.num_cached_tokens = start
            self.blocks.take_cached(req, cached)
            self.blocks.allocate(req, start + n)
            out.seqs.append(ScheduledSeq(req, n))
            budget -= n
            if any(p.times_passed_over >= self.max_skips for p in passed):
                break  # fairness bound reached: nobody overtakes it any more
