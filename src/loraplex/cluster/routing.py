"""AdapterRouting: the ingress's part of routing. Ray Serve picks the replica; this picks what the request tells
Ray: its adapter as the multiplexed model id (go where it is held), or no id (go by queue length: Ray's power of
two choices), which it does when the adapter is *hot* (its requests in flight reach `hot_threshold` per replica
running it) or keeps its holders *busy* (it has `spill_margin` requests in flight itself, and the least loaded of
its holders runs `spill_margin` more requests than the least loaded replica). The replica such a request reaches
claims the adapter too, and from then on Ray spreads it over both: popular adapters end up on several replicas,
the long tail on one. Ray alone moves a model to another replica only once every holder refuses requests
(max_ongoing_requests), so a popular adapter otherwise queues on one replica while another idles.

An adapter with fewer requests in flight than `spill_margin` never spills for a busy holder: its holder is busy with
other adapters' requests, and a copy elsewhere would cost a cold load and evict an adapter there, for a wait of a
request or two (measured in benchmarks/cluster.py: spilling on load alone gave 1.9x fewer cold loads than
queue-length routing; this rule, the figure in the README). Also the routing counters /metrics shows. No Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loraplex.cluster.messages import RouteInfo


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
    results: Counter[str] = field(default_factory=Counter)  # hit / miss (adapter requests) and spill

    def set_live(self, replicas: set[str]) -> None:
        """The replicas reporting now: a dead one holds nothing and is no one's idlest."""
        self.live = replicas
        for held in self.holders.values():
            held &= replicas

    def dispatch(self, adapter: str | None) -> str:
        """The multiplexed model id to send `adapter`'s next request with ("" = none: power of two choices);
        the request counts as in flight from now (pair with `started` or `abandoned`)."""
        if adapter is None:
            return ""
        self.pending[adapter] += 1
        if not self.affinity:
            return ""
        running = self.in_flight.get(adapter, Counter())
        own = self.pending[adapter] - 1 + sum(running.values())  # this adapter's other requests, sent or running
        hot = own >= self.hot_threshold * max(1, len(running))
        held = self.holders.get(adapter, set()) & self.live
        busy = bool(held) and own >= self.spill_margin and (
            min(self.load[r] for r in held) >= min(self.load[r] for r in self.live) + self.spill_margin)
        if hot or busy:
            self.results["spill"] += 1
            return ""
        return adapter

    def abandoned(self, adapter: str | None) -> None:
        """A dispatched request that reached no replica."""
        if adapter is not None:
            self._drop_pending(adapter)

    def started(self, adapter: str | None, label: str, route: RouteInfo) -> None:
        self.routed[(route.replica, label)] += 1
        self.load[route.replica] += 1
        if adapter is not None:
            self._drop_pending(adapter)
            self.results["hit" if route.resident else "miss"] += 1
            self.in_flight.setdefault(adapter, Counter())[route.replica] += 1
            self.holders.setdefault(adapter, set()).add(route.replica)

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
