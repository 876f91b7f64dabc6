"""Adapter-cache metrics: counters and histograms by tier, read by the HTTP server's /metrics. No torch."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIERS = ("device", "host")


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0
    samples: list[float] = field(default_factory=list)  # kept (bounded) for percentiles in benchmarks

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1
        if len(self.samples) < 100_000:
            self.samples.append(value)

    @classmethod
    def summed(cls, values: list[Histogram]) -> Histogram:
        """Several engines' histograms of one quantity, bucket by bucket (a cluster's totals; no samples)."""
        first = values[0]
        return replace(first, counts=[sum(c) for c in zip(*(h.counts for h in values))],
                       total=sum(h.total for h in values), n=sum(h.n for h in values), samples=[])

    def percentile(self, q: float) -> float:
        if not self.samples:
            return float("nan")
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(q / 100 * len(s)))]


class AdapterMetrics:
    """loads, load latency, hits, misses and evictions per tier ('host': disk -> host, 'device': host -> slot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loads: dict[str, int] = defaultdict(int)
        self.load_failures: int = 0
        self.hits: dict[str, int] = defaultdict(int)
        self.misses: dict[str, int] = defaultdict(int)
        self.evictions: dict[str, int] = defaultdict(int)
        self.load_latency: dict[str, Histogram] = {t: Histogram() for t in TIERS}

    def load(self, tier: str, seconds: float) -> None:
        with self._lock:
            self.loads[tier] += 1
            self.load_latency[tier].observe(seconds)

    def hit(self, tier: str) -> None:
        with self._lock:
            self.hits[tier] += 1

    def miss(self, tier: str) -> None:
        with self._lock:
            self.misses[tier] += 1

    def evict(self, tier: str) -> None:
        with self._lock:
            self.evictions[tier] += 1

    def failure(self) -> None:
        with self._lock:
            self.load_failures += 1


@dataclass(slots=True)
class AdapterStats:
    """A point-in-time view of the adapter cache, published by the HTTP server as Prometheus metrics."""

    loads: dict[str, int]  # tier -> adapters loaded into it (host: from disk; device: into a slot)
    load_failures: int
    load_latency: dict[str, Histogram]  # tier -> seconds per load
    hits: dict[str, int]
    misses: dict[str, int]
    evictions: dict[str, int]
    resident: dict[str, int]  # tier -> adapters held there now
    loading: int  # disk loads in flight
    slot_refs: int  # sum of the device slots' reference counts: 0 whenever no request is scheduled
    queued: dict[str, int]  # adapter name -> requests waiting
    running: dict[str, int]  # adapter name -> requests running
