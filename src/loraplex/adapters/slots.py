"""SlotTable: which adapter occupies which device slot, with reference counts and LRU reuse. No torch.

A slot whose adapter is referenced by a scheduled request is never reassigned; unreferenced slots
keep their adapter (a later request reuses it without a copy) until the least recently used one is
needed for another adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)  # the adapter key (adapters.key.AdapterKey); any hashable in tests


@dataclass(slots=True)
class SlotGrant:
    slot: int
    needs_load: bool  # True when the adapter's weights must be copied into the slot before the next step


class SlotTable(Generic[K]):
    """Not thread-safe by itself: its owner (adapters.manager.AdapterManager) serialises every call."""

    def __init__(self, num_slots: int, pinned: Callable[[K], bool] = lambda key: False) -> None:
        """`pinned(key)`: a pin holds the adapter's slot even while idle (the owner, the manager, keeps the pins)."""
        self.num_slots = num_slots
        self.slot_of: dict[K, int] = {}
        self.refs: dict[K, int] = {}  # scheduled requests referencing each resident adapter's slot
        self.pinned = pinned
        self._free = list(range(num_slots - 1, -1, -1))
        self._idle: OrderedDict[K, None] = OrderedDict()  # resident, unreferenced, LRU first
        self.evictions = 0
        self.hits = 0  # acquire found the adapter already in a slot
        self.misses = 0  # acquire had to copy it in

    def can_acquire(self, key: K) -> bool:
        return key in self.slot_of or bool(self._free) or any(not self.pinned(k) for k in self._idle)

    def acquire(self, key: K) -> SlotGrant | None:
        """Reference `key`'s slot, assigning one (LRU eviction of an idle adapter) if needed; None if all are busy."""
        if key in self.slot_of:
            self._idle.pop(key, None)
            self.refs[key] = self.refs.get(key, 0) + 1
            self.hits += 1
            return SlotGrant(self.slot_of[key], needs_load=False)
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k in self._idle if not self.pinned(k)), None)
            if victim is None:
                return None
            del self._idle[victim]
            slot = self.slot_of.pop(victim)
            self.evictions += 1
        self.slot_of[key] = slot
        self.refs[key] = 1
        self.misses += 1
        return SlotGrant(slot, needs_load=True)

    def release(self, key: K) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self._idle[key] = None  # most recently used at the end

    def invalidate(self, key: K) -> None:
        """Forget a resident adapter (failed load or unload); only allowed when unreferenced."""
        if key in self.refs:
            raise RuntimeError(f"adapter {key!r} is in use")
        self._idle.pop(key, None)
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self._free.append(slot)

    def invalidate_if_idle(self, key: K) -> bool:
        """Free `key`'s slot unless a request holds it; True if it is no longer resident."""
        if key in self.refs:
            return False
        self.invalidate(key)
        return True

    def resident(self) -> list[K]:
        return list(self.slot_of)
