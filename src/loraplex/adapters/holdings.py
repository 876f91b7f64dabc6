"""Holdings: what one engine holds of each adapter version, and why. The request references, the pins, the host tier
(LRU), the device slots with their references, and the disk loads in flight, as one Residency record per version in a
ResidencyTable (adapters/residency.py); the tiers are policies over that table. This is the part of the manager that
knows nothing of names and versions: the catalog (adapters/manager.py AdapterManager, a subclass) says where a
version's files are (`_locate`) and whether it is its name's current one (`_is_current`).

Every change happens under one lock, so a registration on a worker thread and the engine thread's scheduling never
interleave. Reference counts (requests queued or running) protect a version from eviction; pins hold the current
version of a name in a device slot. The engine collects finished loads between steps (`poll`) and copies host weights
into the device slots it is granted.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.key import AdapterKey
from loraplex.adapters.loads import DiskLoads, Loader
from loraplex.adapters.metrics import AdapterMetrics, AdapterStats
from loraplex.adapters.peft_format import AdapterWeights
from loraplex.adapters.residency import HostAdmission, ResidencyTable, admit_all
from loraplex.adapters.slots import SlotGrant, SlotTable
from loraplex.adapters.tiers import TierView, tier_view
from loraplex.errors import AdapterError, InvalidRequestError

log = logging.getLogger(__name__)


class Holdings(ABC):
    def __init__(self, num_slots: int, host_capacity: int, loader: Loader, admits: HostAdmission = admit_all) -> None:
        """`admits`: the host tier's admission policy (adapters/residency.py); call `readmit()` when it changes."""
        # One record per version (read-only outside this class); the tiers are policies over it, asking users, pins
        # and the admission policy through these callbacks.
        self.table: ResidencyTable[AdapterKey, AdapterWeights] = ResidencyTable(num_slots)
        self.slots: SlotTable[AdapterKey] = SlotTable(num_slots, self.is_pinned, self.table)
        self.host: HostCache[AdapterKey, AdapterWeights] = HostCache(host_capacity, self._held, self.cached, self.table)
        self.admits = admits
        self.metrics = AdapterMetrics()
        self.loads = DiskLoads(self.table, loader)
        self._lock = threading.RLock()

    # ---- what the catalog says ------------------------------------------------------------------
    @abstractmethod
    def _locate(self, key: AdapterKey) -> Path:
        """The directory `key`'s files are read from (AdapterNotFoundError if it is not registered)."""

    @abstractmethod
    def _is_current(self, key: AdapterKey) -> bool:
        """Whether `key` is its name's current version (a superseded or unregistered one is freed once unused)."""

    # ---- residency records and pins --------------------------------------------------------------
    def _users(self, key: AdapterKey) -> int:
        rec = self.table.get(key)
        return 0 if rec is None else rec.users

    def is_pinned(self, key: AdapterKey) -> bool:
        """A pin holds this version (a pin holds its name's current version only)."""
        rec = self.table.get(key)
        return rec is not None and rec.pinned

    def _held(self, key: AdapterKey) -> bool:
        return bool(self._users(key)) or self.is_pinned(key)

    def cached(self, key: AdapterKey) -> bool:
        """Whether the host tier keeps `key` after its requests (the one place that decides): a pin keeps it, else
        the admission policy says."""
        return self.is_pinned(key) or self.admits(key)

    @property
    def users(self) -> dict[AdapterKey, int]:
        """Requests queued or running on each version (a copy, for reports and tests)."""
        return {k: r.users for k, r in self.table if r.users}

    def _pinned_names(self) -> set[str]:
        return {k.name for k, r in self.table if r.pinned}

    def resident(self) -> dict[AdapterKey, list[str]]:
        """Each adapter version held in memory -> its tiers ("device", "host")."""
        with self._lock:
            out: dict[AdapterKey, list[str]] = {k: ["host"] for k in self.host.keys()}
            for key in self.slots.resident():
                out.setdefault(key, []).insert(0, "device")
            return out

    def in_memory(self, key: AdapterKey) -> bool:
        """Whether `key` is in either tier (as `key in resident()`, without listing every version held)."""
        with self._lock:
            rec = self.table.get(key)
            return rec is not None and (rec.weights is not None or rec.slot is not None)

    def _set_pin(self, name: str, key: AdapterKey | None) -> None:
        """Move `name`'s pin to `key` (None: unpin it): the tiers hold the pinned version, and only that one."""
        for old in [k for k, r in self.table if k.name == name and r.pinned and k != key]:
            self.table[old].pinned = False
            self._settle(old)
        if key is not None:
            self.table[key].pinned = True
            if key not in self.host:
                self._start_load(key)
            else:
                self._count_evictions(self.host.shrink(keep=key))  # a pin caches it: it now counts

    # ---- request references ---------------------------------------------------------------------
    def acquire(self, key: AdapterKey) -> None:
        """A request now needs `key`: count it and start loading it from disk if it is cold. The host tier never
        evicts it while any request does; whether it stays after them is the admission policy's (`cached`)."""
        with self._lock:
            self.table[key].users += 1
            if self.host.get(key) is not None:  # get() also marks it most recently used
                self.metrics.hit("host")
                self._count_evictions(self.host.shrink(keep=key))  # the policy may cache it now: it counts
            else:
                self.metrics.miss("host")
                self._start_load(key)

    def release(self, key: AdapterKey) -> None:
        with self._lock:
            rec = self.table.get(key)
            if rec is None or rec.users <= 0:
                log.error("adapter %s released more often than acquired", key)
                return
            rec.users -= 1
            if rec.users:
                return
            if not self._is_current(key):
                self._free(key)  # superseded or unregistered: free once unused
            else:
                self._settle(key)
            self._count_evictions(self.host.shrink())  # a burst of in-use adapters may have overfilled the tier

    def _settle(self, key: AdapterKey) -> None:
        """`key` is no longer held: if the policy does not cache it, it leaves the host tier, and its idle device slot
        with it (a slot whose weights left host memory would read as a false "resident")."""
        if not self._held(key) and not self.cached(key):
            self.host.drop(key)
            self.slots.invalidate_if_idle(key)
        self.table.tidy(key)

    def readmit(self) -> int:
        """The admission policy changed (a cluster replica's claims did): drop what it no longer caches, except
        versions a request uses or a pin holds, and make room for what it now caches. Returns how many were dropped."""
        with self._lock:
            drop = [k for k in self.host.keys() if not self.cached(k) and not self._held(k)]
            for key in drop:
                self._settle(key)
                self.metrics.evict("host")
            self._count_evictions(self.host.shrink())
            return len(drop)

    # ---- device slots (the scheduler's and the engine's only way to them) --------------------------
    def ready(self, key: AdapterKey) -> bool:
        """The adapter's weights are in host memory: a slot can be filled from them."""
        with self._lock:
            return key in self.host

    def can_take_slot(self, key: AdapterKey) -> bool:
        with self._lock:
            return self.slots.can_acquire(key)

    def take_slot(self, key: AdapterKey) -> SlotGrant | None:
        """Reference `key`'s device slot (assigning one, LRU, if needed); None when every slot is busy. A grant
        with needs_load must be filled (`weights(key)` copied in) before the next step reads it."""
        with self._lock:
            return self.slots.acquire(key)

    def release_slot(self, key: AdapterKey) -> None:
        with self._lock:
            self.slots.release(key)

    @contextmanager
    def borrow(self, key: AdapterKey, timeout: float = 60.0) -> Iterator[SlotGrant]:
        """One use of `key` outside the scheduler (a prompt's logits), the way a request's is: reference it, wait for
        its load, take a device slot. Yields the grant (the caller fills it if needs_load); both are released after.
        A failed load raises its AdapterError; a busy slot table raises InvalidRequestError."""
        self.acquire(key)  # starts its load if it is cold
        try:
            self.wait([key], timeout)
            failure = self.poll([key]).get(key)
            if failure is not None:
                raise failure
            if not self.ready(key):
                raise AdapterError(f"adapter {key} did not load within {timeout:g} s")
            grant = self.take_slot(key)
            if grant is None:
                raise InvalidRequestError("every adapter slot is busy; call prompt_logits when no requests are running")
            try:
                yield grant
            finally:
                self.release_slot(key)
        finally:
            self.release(key)

    def place_pinned(self) -> list[tuple[int, AdapterKey]]:
        """Give every pinned, loaded adapter that is not resident a slot; returns (slot, key) to fill now."""
        fills = []
        with self._lock:
            for key in sorted(k for k, r in self.table if r.pinned):
                if key in self.host and self.table[key].slot is None:
                    grant = self.slots.acquire(key)
                    if grant is not None:
                        self.slots.release(key)
                        fills.append((grant.slot, key))
        return fills

    def stats(self, queued: dict[str, int], running: dict[str, int]) -> AdapterStats:
        m = self.metrics
        with self._lock:
            return AdapterStats(
                loads={t: m.loads[t] for t in ("host", "device")},
                load_failures=m.load_failures,
                load_latency=dict(m.load_latency),
                hits={"host": m.hits["host"], "device": self.slots.hits},
                misses={"host": m.misses["host"], "device": self.slots.misses},
                evictions={"host": m.evictions["host"], "device": self.slots.evictions},
                resident={"host": len(self.host), "device": len(self.slots.resident())},
                loading=len(self.loading),
                slot_refs=sum(rec.slot_refs for _, _, rec in self.table.on_device()),
                queued=queued,
                running=running,
            )

    def tiers(self) -> TierView:
        """Every device slot's occupant and the host cache's entries (LRU first), with ranks, references and pins."""
        with self._lock:
            return tier_view(self.table, self.host.capacity, self.loads.in_flight())

    def digest(self, key: AdapterKey) -> bytes:
        """The loaded weights' digest (peft_format): with the key, the prefix cache's namespace for the adapter."""
        return self.weights(key).digest

    def weights(self, key: AdapterKey) -> AdapterWeights:
        with self._lock:
            w = self.host.get(key)
        if w is None:
            raise KeyError(key)
        return w

    # ---- loading --------------------------------------------------------------------------------
    def _start_load(self, key: AdapterKey) -> None:
        rec = self.table[key]
        if rec.path is None:
            rec.path = self._locate(key)
        self.loads.start(key, rec.path)

    def poll(self, keys: list[AdapterKey] | None = None) -> dict[AdapterKey, AdapterError]:
        """Collect finished background loads (of `keys`; default: all); return the keys whose load failed, with
        their errors."""
        failed: dict[AdapterKey, AdapterError] = {}
        with self._lock:
            for key, fut, seconds in self.loads.collect(keys):
                err = fut.exception()
                if err is None:
                    self.metrics.load("host", seconds)
                    self._put_host(key, fut.result())
                else:
                    self.metrics.failure()
                    log.warning("adapter %s failed to load: %s", key, err)
                    failed[key] = err if isinstance(err, AdapterError) else AdapterError(f"adapter {key}: {err}")
                self.table.tidy(key)
        return failed

    def wait(self, keys: list[AdapterKey] | None = None, timeout: float = 60.0) -> None:
        """Block until the loads of `keys` (default: all) have finished; `poll()` then collects them."""
        with self._lock:
            futures = self.loads.pending(keys)
        deadline = time.monotonic() + timeout
        for fut in futures:
            try:
                fut.exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return

    @property
    def loading(self) -> list[AdapterKey]:
        with self._lock:
            return self.loads.in_flight()

    def _put_host(self, key: AdapterKey, weights: AdapterWeights) -> None:
        """Loaded weights enter the host tier if a request waits for them or the policy caches them."""
        if self._held(key) or self.cached(key):
            self._count_evictions(self.host.put(key, weights))

    def _count_evictions(self, evicted: list[AdapterKey]) -> None:
        for key in evicted:  # HostCache.drop forgot each record that nothing else refers to
            self.metrics.evict("host")
            log.debug("evicted adapter %s from host memory", key)

    def _free(self, key: AdapterKey) -> None:
        # Each drop forgets the record once nothing refers to it (ResidencyTable.tidy): its path is resolved again if
        # a request names the version later.
        self.host.drop(key)
        self.slots.invalidate_if_idle(key)

    def shutdown(self) -> None:
        self.loads.shutdown()
