"""DiskLoads: adapter versions being read from disk and validated, on one loader thread, never on the engine's step
loop. Each read in flight is its version's record in the residency table (`loading`, `load_started`); the manager
starts reads and collects the finished ones between steps. No torch."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.adapters.key import AdapterKey
from loraplex.adapters.residency import ResidencyTable

if TYPE_CHECKING:
    from loraplex.adapters.peft_format import AdapterWeights

Loader = Callable[[str, Path], "AdapterWeights"]


class DiskLoads:
    """Not thread-safe by itself: its owner (adapters.manager.AdapterManager) serialises every call."""

    def __init__(self, table: ResidencyTable[AdapterKey, AdapterWeights], load: Loader) -> None:
        self.table = table
        self.load = load  # reads and validates one adapter (adapters/loader.py AdapterLoader)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-adapter-loader")

    def start(self, key: AdapterKey, path: Path) -> None:
        """Read `key` from `path` in the background, unless a read is in flight already."""
        rec = self.table[key]
        if rec.loading is None:
            rec.loading, rec.load_started = self._executor.submit(self.load, key.name, path), time.perf_counter()

    def collect(self, keys: list[AdapterKey] | None = None) -> list[tuple[AdapterKey, Future[AdapterWeights], float]]:
        """The finished reads (of `keys`; default: all), taken off their records: (key, its future, seconds taken)."""
        done = []
        for key, rec in self.table:
            fut = rec.loading
            if fut is None or not fut.done() or (keys is not None and key not in keys):
                continue
            rec.loading = None
            done.append((key, fut, time.perf_counter() - rec.load_started))
        return done

    def pending(self, keys: list[AdapterKey] | None = None) -> list[Future[AdapterWeights]]:
        """The reads in flight (of `keys`; default: all), to wait for outside the owner's lock."""
        return [r.loading for k, r in self.table if r.loading is not None and (keys is None or k in keys)]

    def in_flight(self) -> list[AdapterKey]:
        return [k for k, r in self.table if r.loading is not None]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
