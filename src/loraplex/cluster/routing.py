"""AdapterRouting: the ingress's part of routing. Ray Serve picks the replica; this picks what the request tells
Ray: its adapter as the multiplexed model id (go where it is held), or no id when the replicas running that
adapter already carry `hot_threshold` of its requests each (go by queue length: the replica reached claims the
adapter too, and from then on Ray spreads it over both). Ray alone only spills a model to another replica once
every holder refuses requests (max_ongoing_requests), so a hot adapter otherwise queues on one replica. Also
the routing counters /metrics shows. No Ray."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loraplex.cluster.messages import RouteInfo


@dataclass(slots=True)
class AdapterRouting:
    hot_threshold: int
    affinity: bool = True  # False: never send an adapter id (Ray's default routing, for comparison)
    pending: Counter[str] = field(default_factory=Counter)  # adapter -> requests sent, replica not known yet
    in_flight: dict[str, Counter[str]] = field(default_factory=dict)  # adapter -> replica -> requests running
    routed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (replica, model) -> requests sent there
    results: Counter[str] = field(default_factory=Counter)  # hit / miss (adapter requests) and spill

    def dispatch(self, adapter: str | None) -> str:
        """The multiplexed model id to send `adapter`'s next request with ("" = none: power of two choices);
        the request counts as in flight from now (pair with `started` or `abandoned`)."""
        if adapter is None:
            return ""
        self.pending[adapter] += 1
        if not self.affinity:
            return ""
        running = self.in_flight.get(adapter, Counter())
        if self.pending[adapter] - 1 + sum(running.values()) >= self.hot_threshold * max(1, len(running)):
            self.results["spill"] += 1
            return ""
        return adapter

    def abandoned(self, adapter: str | None) -> None:
        """A dispatched request that reached no replica."""
        if adapter is not None:
            self._drop_pending(adapter)

    def started(self, adapter: str | None, label: str, route: RouteInfo) -> None:
        self.routed[(route.replica, label)] += 1
        if adapter is not None:
            self._drop_pending(adapter)
            self.results["hit" if route.resident else "miss"] += 1
            self.in_flight.setdefault(adapter, Counter())[route.replica] += 1

    def finished(self, adapter: str | None, route: RouteInfo) -> None:
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
