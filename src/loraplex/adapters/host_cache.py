"""HostCache: validated adapters in host memory, LRU, never evicting one that a request or a pin holds; plus
transient entries, held for their requests only, outside the capacity (a cluster replica serves an adapter it does
not claim that way: it must not evict a claimed one for it). No torch use."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class HostCache(Generic[K, V]):
    def __init__(self, capacity: int, held: Callable[[K], bool] = lambda key: False) -> None:
        """`held(key)`: a request or a pin holds the adapter, so it is never evicted. The owner (the manager) keeps
        those counts and pins; the cache only asks."""
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()  # least recently used first
        self.held = held
        self.transient: set[K] = set()  # entries outside the capacity, dropped when their last request ends

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        return list(self._entries)

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The entry without marking it used (for reports)."""
        return self._entries.get(key)

    def put(self, key: K, value: V, keep: bool = True) -> list[K]:
        """Insert as most recently used; evict LRU entries no one holds until within capacity. Returns evicted keys.
        keep=False: a transient entry, which neither counts against the capacity nor evicts anything (a cached entry
        of that key stays cached).

        When every entry is held the cache exceeds its capacity rather than evict an adapter in use."""
        cached = key in self._entries and key not in self.transient
        self._entries[key] = value
        self._entries.move_to_end(key)
        if not keep and not cached:
            self.transient.add(key)
            return []
        return self.keep(key)

    def keep(self, key: K) -> list[K]:
        """Make `key` a cached entry (no longer transient), evicting as `put` does; returns the evicted keys."""
        self.transient.discard(key)
        return self.shrink(keep=key)

    def shrink(self, keep: K | None = None) -> list[K]:
        """Evict least recently used entries that nobody holds until within capacity; returns their keys."""
        evicted = []
        for k in list(self._entries):
            if len(self._entries) - len(self.transient) <= self.capacity:
                break
            if k != keep and not self.held(k) and k not in self.transient:
                del self._entries[k]
                evicted.append(k)
        return evicted

    def drop(self, key: K) -> None:
        self._entries.pop(key, None)
        self.transient.discard(key)
