"""HostCache: validated adapters in host memory, LRU, never evicting one that a request or a pin holds. Entries the
owner's admission policy does not cache sit outside the capacity: they neither count nor evict, and the owner drops
them when their last request ends (adapters/residency.py says why a cluster replica has such entries). No torch."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class HostCache(Generic[K, V]):
    def __init__(self, capacity: int, held: Callable[[K], bool] = lambda key: False,
                 cached: Callable[[K], bool] = lambda key: True) -> None:
        """`held(key)`: a request or a pin holds the adapter, so it is never evicted. `cached(key)`: the entry counts
        against the capacity (else it is held for its requests only). The owner (the manager) keeps the counts, pins
        and policy; the cache only asks."""
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()  # least recently used first
        self.held = held
        self.cached = cached

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        return list(self._entries)

    def uncached(self) -> list[K]:
        """Entries outside the capacity (held for their requests only)."""
        return [k for k in self._entries if not self.cached(k)]

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The entry without marking it used (for reports)."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> list[K]:
        """Insert as most recently used; evict LRU entries no one holds until within capacity. Returns evicted keys.

        When every entry is held the cache exceeds its capacity rather than evict an adapter in use."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        return self.shrink(keep=key)

    def shrink(self, keep: K | None = None) -> list[K]:
        """Evict least recently used cached entries that nobody holds until within capacity; returns their keys."""
        counted = [k for k in self._entries if self.cached(k)]
        evicted = []
        for k in counted:
            if len(counted) - len(evicted) <= self.capacity:
                break
            if k != keep and not self.held(k):
                del self._entries[k]
                evicted.append(k)
        return evicted

    def drop(self, key: K) -> None:
        self._entries.pop(key, None)
