"""Residency: everything the manager knows of one adapter version it holds or is asked for — where its weights are
read from, the requests using it, whether a pin holds it, its disk load in flight, its weights in host memory and
its device slot with that slot's references — in one record per key, kept in one ResidencyTable. The host tier
(HostCache) and the device slots (SlotTable) are eviction policies over the table: they decide which record's
weights or slot go, and hold no copy of who holds what. No torch.

HostAdmission is the host tier's policy hook: whether a loaded version is *cached* (it counts against the tier's
capacity and may evict the least recently used entry) or held only while requests use it (dropped after the last
one, evicting nothing). A single engine admits every adapter; a cluster replica admits those Ray Serve's
multiplexing has it claim (cluster/replica.py), so that an adapter it serves only now and then evicts no claimed one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from loraplex.adapters.key import AdapterKey

K = TypeVar("K", bound=Hashable)  # the adapter key (AdapterKey); any hashable in the tiers' own tests
V = TypeVar("V")  # the weights held in host memory (peft_format.AdapterWeights)

HostAdmission = Callable[[AdapterKey], bool]


def admit_all(key: AdapterKey) -> bool:
    return True


@dataclass(slots=True)
class Residency(Generic[V]):
    path: Path | None = None  # where the weights are read from (resolved from the registry)
    users: int = 0  # requests queued or running on this version
    pinned: bool = False  # a pin holds it (a pin holds its name's current version only)
    loading: Future[Any] | None = None  # the disk read in flight
    load_started: float = 0.0  # perf_counter() when that read was submitted
    weights: V | None = None  # in host memory: the host tier holds it
    host_used: int = 0  # the table's clock when it was last used in host memory (LRU)
    slot: int | None = None  # the device slot its weights are copied into
    slot_refs: int = 0  # scheduled requests referencing that slot
    slot_idle_since: int = 0  # the table's clock when its slot's last reference went (LRU reuse)

    @property
    def idle(self) -> bool:
        """Nothing refers to it: its weights may leave both tiers."""
        return not self.users and not self.pinned and self.loading is None

    @property
    def vacant(self) -> bool:
        """Idle and in neither tier: the record itself may go."""
        return self.idle and self.weights is None and self.slot is None


class ResidencyTable(Generic[K, V]):
    """The records, and which key occupies each device slot (the records' `slot`, read the other way). Not
    thread-safe by itself: its owner (adapters.manager.AdapterManager) serialises every call."""

    def __init__(self, num_slots: int) -> None:
        self.records: dict[K, Residency[V]] = {}
        self.occupants: list[K | None] = [None] * num_slots  # slot -> key
        self._clock = 0

    def get(self, key: K) -> Residency[V] | None:
        return self.records.get(key)

    def __getitem__(self, key: K) -> Residency[V]:
        """`key`'s record, made empty if it has none."""
        rec = self.records.get(key)
        if rec is None:
            rec = self.records[key] = Residency()
        return rec

    def __iter__(self) -> Iterator[tuple[K, Residency[V]]]:
        return iter(list(self.records.items()))

    def tick(self) -> int:
        """The next value of the table's clock (LRU order in both tiers)."""
        self._clock += 1
        return self._clock

    def tidy(self, key: K) -> None:
        """Forget `key`'s record once nothing refers to it and neither tier holds it."""
        rec = self.records.get(key)
        if rec is not None and rec.vacant:
            del self.records[key]

    # ---- the host tier ----------------------------------------------------------------------------
    def in_host(self, ordered: bool = True) -> list[K]:
        """Keys with weights in host memory, least recently used first (`ordered`; else in no particular order)."""
        held = [(rec.host_used, k) for k, rec in self.records.items() if rec.weights is not None]
        return [k for _, k in (sorted(held, key=lambda t: t[0]) if ordered else held)]

    # ---- the device slots -------------------------------------------------------------------------
    def occupy(self, key: K, slot: int) -> Residency[V]:
        assert self.occupants[slot] is None, f"slot {slot} is taken by {self.occupants[slot]!r}"
        rec = self[key]
        rec.slot = slot
        self.occupants[slot] = key
        return rec

    def vacate(self, key: K) -> None:
        """`key` leaves its slot (unreferenced)."""
        rec = self.records[key]
        assert rec.slot is not None and not rec.slot_refs
        self.occupants[rec.slot] = None
        rec.slot = None
        self.tidy(key)

    def on_device(self) -> list[tuple[int, K, Residency[V]]]:
        """(slot, key, record) of every occupied slot, by slot."""
        return [(s, k, self.records[k]) for s, k in enumerate(self.occupants) if k is not None]
