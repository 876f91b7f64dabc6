"""AdapterRouting: the ingress's part of routing. Ray Serve picks the replica; this picks what the request tells
Ray: its adapter as the multiplexed model id (go where it is held), or no id (go by queue length: Ray's power of
two choices), which it does when the adapter is *hot* (its requests in flight reach `hot_threshold` per replica
running it), *popular* and held by too few replicas (below) or keeps its holders *busy* (it has `spill_margin`
requests in flight itself, and the least loaded of its holders runs `spill_margin` more requests than the least
loaded replica). The replica a hot adapter's request
reaches claims the adapter too, and from then on Ray spreads it over both: hot adapters end up on several replicas,
the long tail on one. Ray alone moves a model to another replica only once every holder refuses requests
(max_ongoing_requests), so a hot adapter otherwise queues on one replica while another idles. A request spilled for
a busy holder is served on a transient copy instead (unless that replica claims the adapter already): a claim there
would last, since Ray then sends the adapter's requests to both holders and keeps both claims fresh, and each such
duplicate takes a place from the long tail for good, and such duplicates add up over a run (benchmarks/cluster.py
counts the transient copies that avoid them; docs/benchmarks/REPORT.md).

An adapter with fewer requests in flight than `spill_margin` never spills for a busy holder: its holder is busy with
other adapters' requests, and a copy elsewhere would cost a cold load for a wait of a request or two: spilling on
load alone cost cold loads this rule avoids (benchmarks/cluster.py compares the routings' cold loads; the figures
are in docs/benchmarks/REPORT.md). Also the routing counters /metrics shows. No Ray.

A *popular* adapter, one with `replicate_share` or more of the recent requests, is kept on one more replica for each
`replicate_share` it has (two, on two replicas): while fewer hold it, a request whose holders are all busier than a
replica that does not hold it goes by queue length, and the replica it reaches claims it. Ray then chooses between
the holders by queue length, so the most requested adapters, a large part of the traffic under Zipf popularity, go
wherever there is room, which balances the replicas' load that affinity alone leaves uneven (the busier replica's
share of the requests, traced on benchmarks/cluster.py's stream, is in docs/cluster.md). It
costs the long tail a place per copy, the popular adapter's cold load once.

The ingress also counts each adapter's requests (`popularity`: sent with the request for the replica's claim
admission, cluster/admission.py, and the share above). An adapter whose latest request a replica declined to claim,
with no holder known, is claimed nowhere, so its next request goes by queue length too: Ray would otherwise wait a
routing retry for a holder.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from loraplex.cluster.admission import Popularity
from loraplex.cluster.messages import RouteInfo


def holders_wanted(share: float, replicate_share: float, replicas: int) -> int:
    """How many replicas should hold an adapter with `share` of the recent requests: one, plus one per
    `replicate_share` of the traffic, at most all `replicas`."""
    return min(replicas, 1 + int(share / replicate_share))


class Dispatch(NamedTuple):
    model_id: str  # the multiplexed model id to send ("": none, Ray's power of two choices by queue length)
    claim: bool  # whether the replica it reaches may claim the adapter (False: a transient copy, unless held there)


@dataclass(slots=True)
class AdapterRouting:
    hot_threshold: int
    spill_margin: int
    affinity: bool = True  # False: never send an adapter id (Ray's default routing, for comparison)
    pending: Counter[str] = field(default_factory=Counter)  # adapter -> requests sent, replica not known yet
    in_flight: dict[str, Counter[str]] = field(default_factory=dict)  # adapter -> replica -> requests running
    load: Counter[str] = field(default_factory=Counter)  # replica -> requests running there (every model)
    holders: dict[str, set[str]] = field(default_factory=dict)  # adapter -> replicas that took its requests
    live: set[str] = field(default_factory=set)  # replicas reporting to the board
    routed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (replica, model) -> requests sent there
    results: Counter[str] = field(default_factory=Counter)  # hit / miss / transient (adapter requests) and spill
    popularity: Popularity | None = None  # request counts: claim admission and replication (None: neither)
    replicate_share: float = 0.1  # a share of the recent requests that earns an adapter one more holder (> 1: never)
    unclaimed: set[str] = field(default_factory=set)  # adapters whose latest request a replica did not claim

    def requested(self, adapter: str | None, now: float) -> float | None:
        """Count a request for `adapter`; its popularity (None: none counted): for the replicas' claim admission
        and for `dispatch`."""
        if adapter is None or self.popularity is None or not self.affinity:
            return None
        return self.popularity.hit(adapter, now)

    def set_live(self, replicas: set[str]) -> None:
        """The replicas reporting now: a dead one holds nothing and is no one's idlest."""
        self.live = replicas
        for held in self.holders.values():
            held &= replicas

    def dispatch(self, adapter: str | None, popularity: float | None = None) -> Dispatch:
        """How to send `adapter`'s next request, `popularity` as `requested` returned it; it counts as in flight
        from now (pair with `started` or `abandoned`)."""
        if adapter is None:
            return Dispatch("", True)
        self.pending[adapter] += 1
        if not self.affinity or adapter in self.unclaimed:
            return Dispatch("", True)
        running = self.in_flight.get(adapter, Counter())
        own = self.pending[adapter] - 1 + sum(running.values())  # this adapter's other requests, sent or running
        hot = own >= self.hot_threshold * max(1, len(running))
        held = self.holders.get(adapter, set()) & self.live
        if hot:
            self.results["spill"] += 1
            return Dispatch("", True)
        if not held:
            return Dispatch(adapter, True)
        holder_load = min(self.load[r] for r in held)
        if len(held) < self._copies(popularity) and holder_load > min(self.load[r] for r in self.live - held):
            self.results["replicate"] += 1  # a less loaded replica that does not hold it may claim it
            return Dispatch("", True)
        if own >= self.spill_margin and holder_load >= min(self.load[r] for r in self.live) + self.spill_margin:
            self.results["spill"] += 1  # busy: a transient copy where it lands
            return Dispatch("", False)
        return Dispatch(adapter, True)

    def _copies(self, popularity: float | None) -> int:
        """How many replicas should hold an adapter with this request count (see `holders_wanted`)."""
        if popularity is None or self.popularity is None:
            return 1
        return holders_wanted(self.popularity.share(popularity), self.replicate_share, len(self.live))

    def abandoned(self, adapter: str | None) -> None:
        """A dispatched request that reached no replica."""
        if adapter is not None:
            self._drop_pending(adapter)

    def started(self, adapter: str | None, label: str, route: RouteInfo, claim: bool = True) -> None:
        """A dispatched request reached `route.replica`; `claim` as dispatched."""
        self.routed[(route.replica, label)] += 1
        self.load[route.replica] += 1
        if adapter is not None:
            self._drop_pending(adapter)
            self.results["hit" if route.resident else "miss"] += 1
            self.in_flight.setdefault(adapter, Counter())[route.replica] += 1
            if route.kept:
                self.unclaimed.discard(adapter)
                self.holders.setdefault(adapter, set()).add(route.replica)
                return
            self.results["transient"] += 1
            if claim:  # the replica declined it; claimed nowhere unless a holder is known (a busy spill's copy
                held = self.holders.get(adapter, set())  # says nothing of its holder)
                held.discard(route.replica)
                if not held:
                    self.unclaimed.add(adapter)

    def finished(self, adapter: str | None, route: RouteInfo) -> None:
        self.load[route.replica] -= 1
        if self.load[route.replica] <= 0:
            del self.load[route.replica]
        if adapter is None:
            return
        running = self.in_flight[adapter]
        running[route.replica] -= 1
        if running[route.replica] <= 0:
            del running[route.replica]
        if not running:
            del self.in_flight[adapter]

    def _drop_pending(self, adapter: str) -> None:
        self.pending[adapter] -= 1
        if self.pending[adapter] <= 0:
            del self.pending[adapter]
