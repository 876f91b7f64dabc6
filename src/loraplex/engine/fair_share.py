"""Weighted fair sharing of the running batch between tenants (no torch): the scheduler's admission order, its
prefill order and its preemption victim.

A tenant is whatever `Request.tenant` names (the engine sets the API key's tenant, else the adapter's name; None is
one tenant of its own), with `Request.weight`. While several tenants are backlogged, every running request decodes
one token a step, so a tenant's share of decode tokens is its share of the running batch: a free place goes to the
waiting tenant with the fewest running requests per unit of weight (a tenant with none running comes first), and
ties go to the one with the least service, the tokens scheduled for it per unit of weight. Loads are compared with
the place taken, so a weight that does not divide the batch alternates its tenant's places around its share.
Service is counted from the virtual time a tenant becomes active (the least service among active tenants), so an
idle tenant banks no credit, and a tenant with nothing left is forgotten (the books stay as small as the set of
active tenants). Preemption takes the newest lowest-priority request of the tenant furthest over its share. Within
a tenant the order is vLLM's `priority` (lower first), then arrival, as without tenants.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable, Iterator

from loraplex.engine.request import Request


class FairShare:
    def __init__(self) -> None:
        self.service: dict[Hashable, float] = {}  # tenant -> tokens scheduled / weight, since it became active
        self.live: dict[Hashable, int] = {}  # tenant -> its requests waiting or running

    def _floor(self) -> float:
        return min(self.service.values(), default=0.0)

    def charge(self, req: Request, tokens: int) -> None:
        """`tokens` computed for `req` this step."""
        t = req.tenant
        if t not in self.service:
            self.service[t] = self._floor()  # joins at the virtual time: no credit for having been idle
        self.service[t] += tokens / req.weight

    def joined(self, req: Request) -> None:
        """`req` entered the scheduler (waiting)."""
        self.live[req.tenant] = self.live.get(req.tenant, 0) + 1

    def left(self, req: Request) -> None:
        """`req` finished. A tenant with no request left is forgotten: it rejoins at the virtual time. A count per
        tenant, so that a request's end costs O(1), not a scan of every request waiting or running."""
        n = self.live.get(req.tenant, 0) - 1
        if n > 0:
            self.live[req.tenant] = n
        else:
            self.live.pop(req.tenant, None)
            self.service.pop(req.tenant, None)

    def load(self, running: Iterable[Request]) -> dict[Hashable, float]:
        """Running requests per unit of weight, per tenant."""
        return {t: load for t, (_, load, _) in _tally(running).items()}

    def over_share(self, running: list[Request]) -> set[Hashable]:
        """Tenants holding more than one request beyond their weight's share of the running places (none while one
        runs alone)."""
        tally = _tally(running)
        total = sum(w for _, _, w in tally.values())
        return {t for t, (n, _, w) in tally.items() if n > len(running) * w / total + 1}

    def far_under(self, running: list[Request]) -> set[Hashable]:
        """Tenants running at most half the places per unit of weight of the busiest one (none while one runs alone
        or all run alike)."""
        load = self.load(running)
        top = max(load.values(), default=0.0)
        return {t for t, held in load.items() if 2.0 * held <= top}

    def admission_order(self, waiting: Iterable[Request], running: list[Request]) -> Iterator[Request]:
        """Waiting requests in the order places go to them: each next one is the head of the tenant whose load would
        be least with it admitted (as if the ones before it were; with weights that do not divide the batch, this
        lets a tenant's places alternate around its share), then the least service, then the earliest head."""
        arrived: dict[Hashable, list[Request]] = {}
        for r in waiting:
            arrived.setdefault(r.tenant, []).append(r)
        # Within a tenant: vLLM's priority (lower first), then the waiting order (stable).
        queues = {t: deque(sorted(rs, key=lambda r: r.priority)) for t, rs in arrived.items()}
        load = self.load(running)
        floor = self._floor()
        heap = [(load.get(t, 0.0) + 1.0 / q[0].weight, self.service.get(t, floor), i, t) for i, (t, q) in
                enumerate(queues.items())]
        heapq.heapify(heap)
        while heap:
            _, service, i, t = heapq.heappop(heap)
            req = queues[t].popleft()
            yield req
            load[t] = load.get(t, 0.0) + 1.0 / req.weight
            if queues[t]:
                heapq.heappush(heap, (load[t] + 1.0 / queues[t][0].weight, service, i, t))

    def prefill_order(self, running: list[Request]) -> list[Request]:
        """Running requests in the order the step's token budget goes to them: every decode (one token each)
        first, then the prompts being prefilled, the tenant with the least service first; arrival order within."""
        floor = self._floor()

        def key(r: Request) -> tuple[bool, float]:
            prefill = r.num_computed_tokens < len(r.prompt_token_ids)
            return prefill, self.service.get(r.tenant, floor) if prefill else 0.0

        return sorted(running, key=key)

    def victim(self, candidates: list[Request], running: list[Request]) -> Request:
        """The request to preempt among `candidates` (running, in arrival order): of the tenant furthest over its
        share (the most load, then the most service), its lowest-priority request, the newest of those."""
        load = self.load(running)
        floor = self._floor()
        newest = {r.tenant: i for i, r in enumerate(candidates)}  # a tie goes to the tenant of the newest request
        tenant = max(newest, key=lambda t: (load.get(t, 0.0), self.service.get(t, floor), newest[t]))
        mine = [r for r in reversed(candidates) if r.tenant == tenant]  # newest first: max keeps the first of a tie
        return max(mine, key=lambda r: r.priority)


def _tally(running: Iterable[Request]) -> dict[Hashable, tuple[int, float, float]]:
    """Per tenant, in one pass: its running requests, their load (the sum of 1 / weight: a request keeps the weight
    it was admitted with, across a keys-file reload) and its latest weight."""
    tally: dict[Hashable, tuple[int, float, float]] = {}
    for r in running:
        n, load, _ = tally.get(r.tenant, (0, 0.0, r.weight))
        tally[r.tenant] = (n + 1, load + 1.0 / r.weight, r.weight)
    return tally
