"""Residency: what the manager knows of one adapter version it holds or is asked for — where its weights are read
from, the requests using it, whether a pin holds it, its disk load in flight — in one record per key. The host tier
(HostCache) and the device slots (SlotTable) only place weights; they ask the manager about users and pins.

HostAdmission is the host tier's policy hook: whether a loaded version is *cached* (it counts against the tier's
capacity and may evict the least recently used entry) or held only while requests use it (dropped after the last
one, evicting nothing). A single engine admits every adapter; a cluster replica admits those Ray Serve's
multiplexing has it claim (cluster/replica.py), so that an adapter it serves only now and then evicts no claimed one.
No torch."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.adapters.key import AdapterKey

if TYPE_CHECKING:
    from loraplex.adapters.peft_format import AdapterWeights

HostAdmission = Callable[[AdapterKey], bool]


def admit_all(key: AdapterKey) -> bool:
    return True


@dataclass(slots=True)
class Residency:
    path: Path | None = None  # where the weights are read from (resolved from the registry)
    users: int = 0  # requests queued or running on this version
    pinned: bool = False  # a pin holds it (a pin holds its name's current version only)
    loading: Future[AdapterWeights] | None = None  # the disk read in flight
    load_started: float = 0.0  # perf_counter() when that read was submitted

    @property
    def idle(self) -> bool:
        """Nothing refers to it: the record may go once its weights have left both tiers."""
        return not self.users and not self.pinned and self.loading is None
