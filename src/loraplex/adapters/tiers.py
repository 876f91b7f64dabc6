"""TierView: which adapter versions are where right now — each device slot's occupant, the host cache in LRU
order, the disk loads in flight — for the dashboard, read from the residency table (tier_view) under the manager's
lock. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraplex.adapters.key import AdapterKey
from loraplex.adapters.residency import ResidencyTable

if TYPE_CHECKING:
    from loraplex.adapters.peft_format import AdapterWeights


@dataclass(frozen=True, slots=True)
class ResidentAdapter:
    name: str
    version: str
    rank: int | None  # the largest LoRA rank of its layers; None when its weights are no longer in host memory
    refcount: int  # requests holding it in this tier (device: scheduled requests; host: queued or running)
    pinned: bool


@dataclass(frozen=True, slots=True)
class TierView:
    slots: list[ResidentAdapter | None]  # index = device slot; None = empty
    host: list[ResidentAdapter]  # least recently used first
    host_capacity: int
    loading: list[tuple[str, str]]  # (name, version) being read from disk


def tier_view(table: ResidencyTable[AdapterKey, AdapterWeights], host_capacity: int,
              loading: list[AdapterKey]) -> TierView:
    """Every device slot's occupant (with its slot's references) and the host tier's entries, least recently used
    first (with their requests), read from the residency table under its owner's lock; `loading`: the disk reads in
    flight (adapters/loads.py)."""
    def view(key: AdapterKey, refs: int) -> ResidentAdapter:
        rec = table.records[key]
        rank = None if rec.weights is None else rec.weights.rank
        return ResidentAdapter(key.name, key.version, rank, refs, rec.pinned)

    slots: list[ResidentAdapter | None] = [None] * len(table.occupants)
    for slot, key, rec in table.on_device():
        slots[slot] = view(key, rec.slot_refs)
    host = [view(key, table.records[key].users) for key in table.in_host()]
    return TierView(slots, host, host_capacity, [(k.name, k.version) for k in loading])
