"""HostCache: the host tier's policy over the residency table (adapters/residency.py) — validated adapters' weights
in host memory, LRU, never evicting one that a request or a pin holds. Entries the owner's admission policy does not
cache sit outside the capacity: they neither count nor evict, and the owner drops them when their last request ends
(adapters/residency.py says why a cluster replica has such entries). No torch."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from loraplex.adapters.residency import ResidencyTable

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class HostCache(Generic[K, V]):
    def __init__(self, capacity: int, held: Callable[[K], bool] = lambda key: False,
                 cached: Callable[[K], bool] = lambda key: True, table: ResidencyTable[K, V] | None = None) -> None:
        """`held(key)`: a request or a pin holds the adapter, so it is never evicted. `cached(key)`: the entry counts
        against the capacity (else it is held for its requests only). The owner (the manager) keeps the counts, pins
        and policy; the cache only asks. `table`: the records whose weights it places (the owner's; a table of its
        own when alone)."""
        self.capacity = capacity
        self.table: ResidencyTable[K, V] = table if table is not None else ResidencyTable(0)
        self.held = held
        self.cached = cached

    def __contains__(self, key: K) -> bool:
        rec = self.table.get(key)
        return rec is not None and rec.weights is not None

    def __len__(self) -> int:
        return len(self.table.in_host(ordered=False))

    def keys(self) -> list[K]:
        """Least recently used first."""
        return self.table.in_host()

    def uncached(self) -> list[K]:
        """Entries outside the capacity (held for their requests only)."""
        return [k for k in self.keys() if not self.cached(k)]

    def get(self, key: K) -> V | None:
        """The weights, marked most recently used."""
        rec = self.table.get(key)
        if rec is None or rec.weights is None:
            return None
        rec.host_used = self.table.tick()
        return rec.weights

    def peek(self, key: K) -> V | None:
        """The entry without marking it used (for reports)."""
        rec = self.table.get(key)
        return None if rec is None else rec.weights

    def put(self, key: K, value: V) -> list[K]:
        """Insert as most recently used; evict LRU entries no one holds until within capacity. Returns evicted keys.

        When every entry is held the cache exceeds its capacity rather than evict an adapter in use."""
        rec = self.table[key]
        rec.weights, rec.host_used = value, self.table.tick()
        return self.shrink(keep=key)

    def shrink(self, keep: K | None = None) -> list[K]:
        """Evict least recently used cached entries that nobody holds until within capacity; returns their keys."""
        if sum(1 for k in self.table.in_host(ordered=False) if self.cached(k)) <= self.capacity:
            return []  # the common case, on every request's release: no order needed
        counted = [k for k in self.keys() if self.cached(k)]
        evicted = []
        for k in counted:
            if len(counted) - len(evicted) <= self.capacity:
                break
            if k != keep and not self.held(k):
                self.drop(k)
                evicted.append(k)
        return evicted

    def drop(self, key: K) -> None:
        rec = self.table.get(key)
        if rec is not None:
            rec.weights = None
            self.table.tidy(key)
