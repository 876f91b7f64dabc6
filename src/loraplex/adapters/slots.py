"""SlotTable: the device slots' policy — which adapter a slot goes to, with reference counts and LRU reuse — over the
residency table (adapters/residency.py), which records each version's slot and references. No torch.

A slot whose adapter is referenced by a scheduled request is never reassigned; unreferenced slots
keep their adapter (a later request reuses it without a copy) until the least recently used one is
needed for another adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from loraplex.adapters.residency import ResidencyTable

K = TypeVar("K", bound=Hashable)  # the adapter key (adapters.key.AdapterKey); any hashable in tests


@dataclass(slots=True)
class SlotGrant:
    slot: int
    needs_load: bool  # True when the adapter's weights must be copied into the slot before the next step


class SlotTable(Generic[K]):
    """Not thread-safe by itself: its owner (adapters.manager.AdapterManager) serialises every call."""

    def __init__(self, num_slots: int, pinned: Callable[[K], bool] = lambda key: False,
                 table: ResidencyTable[K, Any] | None = None) -> None:
        """`pinned(key)`: a pin holds the adapter's slot even while idle (the owner, the manager, keeps the pins).
        `table`: the records to place (the owner's; a table of its own when alone)."""
        self.num_slots = num_slots
        self.table: ResidencyTable[K, Any] = table if table is not None else ResidencyTable(num_slots)
        assert len(self.table.occupants) == num_slots
        self.pinned = pinned
        self.evictions = 0
        self.hits = 0  # acquire found the adapter already in a slot
        self.misses = 0  # acquire had to copy it in

    @property
    def slot_of(self) -> dict[K, int]:
        """Each resident adapter's slot (a copy, for reports and tests)."""
        return {k: s for s, k, _ in self.table.on_device()}

    @property
    def refs(self) -> dict[K, int]:
        """Scheduled requests referencing each resident adapter's slot, where any do (a copy)."""
        return {k: rec.slot_refs for _, k, rec in self.table.on_device() if rec.slot_refs}

    def _free_slot(self) -> int | None:
        return next((s for s, k in enumerate(self.table.occupants) if k is None), None)

    def _victim(self) -> K | None:
        """The unpinned adapter whose slot fell idle longest ago."""
        idle = [(rec.slot_idle_since, k) for _, k, rec in self.table.on_device()
                if not rec.slot_refs and not self.pinned(k)]
        return min(idle, key=lambda t: t[0])[1] if idle else None

    def can_acquire(self, key: K) -> bool:
        rec = self.table.get(key)
        return (rec is not None and rec.slot is not None) or self._free_slot() is not None or self._victim() is not None

    def acquire(self, key: K) -> SlotGrant | None:
        """Reference `key`'s slot, assigning one (LRU eviction of an idle adapter) if needed; None if all are busy."""
        rec = self.table.get(key)
        if rec is not None and rec.slot is not None:
            rec.slot_refs += 1
            self.hits += 1
            return SlotGrant(rec.slot, needs_load=False)
        slot = self._free_slot()
        if slot is None:
            victim = self._victim()
            if victim is None:
                return None
            slot = self.table.records[victim].slot
            assert slot is not None
            self.table.vacate(victim)
            self.evictions += 1
        rec = self.table.occupy(key, slot)
        rec.slot_refs = 1
        self.misses += 1
        return SlotGrant(slot, needs_load=True)

    def release(self, key: K) -> None:
        rec = self.table.records[key]
        assert rec.slot_refs > 0, f"slot of {key!r} released more often than acquired"
        rec.slot_refs -= 1
        if not rec.slot_refs:
            rec.slot_idle_since = self.table.tick()  # most recently used

    def invalidate(self, key: K) -> None:
        """Forget a resident adapter (failed load or unload); only allowed when unreferenced."""
        rec = self.table.get(key)
        if rec is None or rec.slot is None:
            return
        if rec.slot_refs:
            raise RuntimeError(f"adapter {key!r} is in use")
        self.table.vacate(key)

    def invalidate_if_idle(self, key: K) -> bool:
        """Free `key`'s slot unless a request holds it; True if it is no longer resident."""
        rec = self.table.get(key)
        if rec is not None and rec.slot_refs:
            return False
        self.invalidate(key)
        return True

    def resident(self) -> list[K]:
        return [k for _, k, _ in self.table.on_device()]
