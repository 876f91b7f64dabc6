"""Which adapters a replica claims: frequency-aware admission on top of Ray Serve's LRU of claims (TinyLFU's rule).

Ray Serve's multiplexing keeps, per replica, an LRU of the adapter ids it claimed; a request for an adapter no replica
claims evicts the least recently used claim of the replica it reaches. Under Zipf popularity that is the wrong trade
for the long tail: an adapter requested once in minutes evicts one requested every few seconds, which then costs a
cold load of its own. So the ingress counts each adapter's requests, decayed with a half-life (`Popularity`), and
sends that count with the request; the replica claims a new adapter only when it is more popular than the claim it
would evict (`ClaimAdmission`). Otherwise it serves the request on a transient copy in host memory, loaded for that
request and dropped after it, which evicts no claimed adapter there (its run takes a device slot, as any request's
does). Every request is served; only what stays in memory changes.

Measured in benchmarks/cluster.py (and simulated, cluster_sim.py): see docs/cluster.md. No Ray."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field


def decayed(count: float, seconds: float, half_life_s: float) -> float:
    return count * 0.5 ** (max(seconds, 0.0) / half_life_s)


@dataclass(slots=True)
class Popularity:
    """The ingress's request count per adapter, each request weighing 1 and halving every `half_life_s`; and the
    count of all requests, decayed alike, so that a count is also a share of the traffic."""

    half_life_s: float
    counts: dict[str, tuple[float, float]] = field(default_factory=dict)  # adapter -> (count, as of when)
    total: tuple[float, float] = (0.0, 0.0)  # every adapter's requests: (count, as of when)
    _hits: int = 0

    def hit(self, adapter: str, now: float) -> float:
        """Count one request for `adapter` at `now`; returns its count including this request."""
        self.counts[adapter] = self._plus_one(self.counts.get(adapter, (0.0, now)), now)
        self.total = self._plus_one(self.total, now)
        self._hits += 1
        if self._hits % 4096 == 0:
            self._forget(now)
        return self.counts[adapter][0]

    def _plus_one(self, counted: tuple[float, float], now: float) -> tuple[float, float]:
        """A (count, as of when) decayed to `now`, plus this request."""
        count, at = counted
        return decayed(count, now - at, self.half_life_s) + 1.0, now

    def share(self, count: float) -> float:
        """What part of the recent traffic `count`, as `hit` just returned it, is."""
        return count / max(self.total[0], 1.0)

    def _forget(self, now: float) -> None:
        """Drop counts that have decayed to nothing: names seen once (typos, retired adapters) do not pile up."""
        for adapter, (count, at) in list(self.counts.items()):
            if decayed(count, now - at, self.half_life_s) < 0.01:
                del self.counts[adapter]


@dataclass(slots=True)
class ClaimAdmission:
    """A replica's view of its claims: Ray's LRU order (claims are touched in the same calls), each with the adapter's
    popularity at its latest request here. Ray's unclaim callback and the request path both change it: one lock."""

    capacity: int  # Ray's max_num_models_per_replica
    half_life_s: float
    claims: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)  # least recently used first
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, adapter: str, popularity: float | None, now: float) -> bool:
        """Whether to claim `adapter` for a request sent with `popularity` (None: no count, claim as plain LRU)."""
        with self._lock:
            if popularity is None or adapter in self.claims or len(self.claims) < self.capacity:
                return True
            count, at = next(iter(self.claims.values()))  # the claim Ray would evict
            return popularity > decayed(count, now - at, self.half_life_s)

    def holds(self, adapter: str) -> bool:
        with self._lock:
            return adapter in self.claims

    def claimed(self, adapter: str, popularity: float | None, now: float) -> None:
        with self._lock:
            self.claims[adapter] = (popularity or 0.0, now)
            self.claims.move_to_end(adapter)

    def unclaimed(self, adapter: str) -> None:
        with self._lock:
            self.claims.pop(adapter, None)
