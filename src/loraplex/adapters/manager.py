"""AdapterManager: the one owner of adapter state — names and versions (the registry), the host tier (LRU),
the device slots and their reference counts — and the only API the engine uses for adapters.

Disk reads and validation run on a loader thread (or, for a registration, on the caller's thread), never on
the engine's step loop; the engine calls `poll()` between steps to collect finished loads, and copies host
weights into the device slots it is granted between steps. Every change to the tiers, the slot table and the
reference counts happens under one lock, so a registration from a worker thread and the engine thread's
scheduling never interleave. Reference counts (requests queued or running) protect adapters from eviction;
a version superseded by a promotion is freed once its last request finishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.metrics import AdapterMetrics, AdapterStats
from loraplex.adapters.peft_format import AdapterWeights
from loraplex.adapters.registry import AdapterInfo, AdapterRegistry
from loraplex.adapters.slots import SlotGrant, SlotTable
from loraplex.adapters.tiers import ResidentAdapter, TierView
from loraplex.errors import AdapterError, InvalidRequestError

log = logging.getLogger(__name__)

Loader = Callable[[str, Path], AdapterWeights]


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, num_slots: int, host_capacity: int, loader: Loader) -> None:
        self.registry = registry
        # Pins and request counts live here only; the tiers ask through these predicates.
        self.slots: SlotTable[AdapterKey] = SlotTable(num_slots, self.is_pinned)  # read-only outside this class
        self.host: HostCache[AdapterKey, AdapterWeights] = HostCache(
            host_capacity, lambda key: bool(self.users.get(key)) or self.is_pinned(key))
        self.metrics = AdapterMetrics()
        self._load = loader
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-adapter-loader")
        self._loading: dict[AdapterKey, tuple[Future[AdapterWeights], float]] = {}
        self._paths: dict[AdapterKey, Path] = {}
        self._transient_loads: set[AdapterKey] = set()  # loading for requests that keep it only while they run
        self.users: dict[AdapterKey, int] = {}  # requests queued or running on each version
        self._pins: dict[str, AdapterKey] = {}  # pinned name -> the version its pin holds: always the current one
        for name, entry in registry.entries.items():
            if entry.pinned:
                self._set_pin(name, AdapterKey(name, entry.current))

    def is_pinned(self, key: AdapterKey) -> bool:
        """A pin holds this version (a pin holds its name's current version only)."""
        return self._pins.get(key.name) == key

    # ---- names and versions ---------------------------------------------------------------------
    def resolve(self, spec: AdapterSpec) -> AdapterKey:
        """The version a new request for `spec` runs on (the current one unless the spec names a version)."""
        key, path = self.registry.resolve(spec)
        with self._lock:
            self._paths[key] = path
        return key

    def register(self, spec: AdapterSpec, path: Path, promote: bool = True, persistent: bool = True) -> AdapterKey:
        """Load and validate now (in the caller's thread, outside the lock: decoding goes on), then register;
        the previous version is freed once its requests finish. Returns the new version's key."""
        t0 = time.perf_counter()
        weights = self._load(spec.name, Path(path))  # raises a named AdapterError; nothing registered then
        with self._lock:
            key = self.registry.register(spec, Path(path), promote, persistent, weights.digest.hex() or None)
            self.metrics.load("host", time.perf_counter() - t0)
            self._paths[key] = Path(path)
            self._put_host(key, weights)  # a fresh key: versions are never reused, so no slot holds it
            if promote:
                self._follow_current(spec.name)
                self._collect_stale(spec.name)
            self._apply_changes()  # what another engine changed, merged before this registration
        return key

    def register_startup(self, modules: list[tuple[str, Path]]) -> None:
        """The start-up flags' modules (name, path), each loaded and validated now, registered under
        adapters/startup.py's rules (never undoing an admin's decision), then the names earlier flags added but
        these no longer give dropped; one log line per name says what happened."""
        for name, path in modules:
            t0 = time.perf_counter()
            weights = self._load(name, path)  # a bad module fails the start, naming it
            with self._lock:
                key, line = self.registry.register_startup(name, path, weights.digest.hex())
                log.info("start-up adapter %s", line)
                if key is not None:
                    if key not in self.host:  # a new version, or the same weights (digest) as that one's
                        self.metrics.load("host", time.perf_counter() - t0)
                        self._put_host(key, weights)
                    self._follow_current(name)
                    self._collect_stale(name)
                self._apply_changes()
        with self._lock:
            for line in self.registry.drop_startup_leftovers({name for name, _ in modules}):
                log.info("start-up adapter %s", line)
            self._free_unregistered()

    def promote(self, name: str, version: str) -> None:
        with self._lock:
            self.registry.promote(name, version)
            self._follow_current(name)
            self._collect_stale(name)
            self._apply_changes()

    def sync(self) -> list[str]:
        """Apply what other engines sharing the registry file changed (registrations, promotions, pins,
        unregistrations), as if they had been made here; requests running keep their version. Returns the names."""
        self.registry.refresh()
        with self._lock:
            return self._apply_changes()

    def _apply_changes(self) -> list[str]:
        names = sorted(self.registry.take_changes())
        for name in names:
            entry = self.registry.entries.get(name)
            if entry is None:  # unregistered elsewhere: free what no request uses
                self._set_pin(name, None)
                held = {k for k in [*self.host.keys(), *self.slots.resident()] if k.name == name}
                for key in held:
                    if not self.users.get(key):
                        self._free(key)
                continue
            self._set_pin(name, AdapterKey(name, entry.current) if entry.pinned else None)
            self._collect_stale(name)
        return names

    def resident(self) -> dict[AdapterKey, list[str]]:
        """Each adapter version held in memory -> its tiers ("device", "host")."""
        with self._lock:
            out: dict[AdapterKey, list[str]] = {k: ["host"] for k in self.host.keys()}
            for key in self.slots.resident():
                out.setdefault(key, []).insert(0, "device")
            return out

    def catalog(self) -> list[AdapterInfo]:
        """Every adapter registered or found under the adapter root (a directory scan: not on the event loop)."""
        out = []
        for name in self.registry.names():
            entry = self.registry.entries.get(name)
            if entry is not None:
                out.append(AdapterInfo(name, entry.current, tuple(sorted(entry.versions)), entry.pinned,
                                       entry.versions.get(entry.current, Path())))
        return out

    def unregister(self, name: str) -> None:
        """An admin's unload (a tombstone in the registry: see AdapterRegistry.unregister); running requests finish."""
        with self._lock:
            entry = self.registry.unregister(name)
            self._set_pin(name, None)
            for version in entry.versions:
                key = AdapterKey(name, version)
                if not self.users.get(key):
                    self._free(key)
            self._apply_changes()

    def _free_unregistered(self) -> None:
        """Unpin and free (where no request uses them) the versions held of names the registry no longer has."""
        for name in [n for n in self._pins if n not in self.registry.entries]:
            self._set_pin(name, None)
        for key in [*self.host.keys(), *self.slots.resident()]:
            if key.name not in self.registry.entries and not self.users.get(key):
                self._free(key)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep `name`'s current version in a device slot (loaded in the background if needed); the pin follows
        later promotions. One slot always stays unpinned, for everyone else."""
        key = self.resolve(AdapterSpec(name))
        with self._lock:
            if pinned and len(set(self._pins) | {name}) >= self.slots.num_slots:
                raise InvalidRequestError(
                    f"cannot pin {name!r}: at most {self.slots.num_slots - 1} adapters may be pinned with "
                    f"--max-loras {self.slots.num_slots}; raise --max-loras"
                )
            self.registry.set_pinned(name, pinned)
            self._set_pin(name, key if pinned else None)
            self._apply_changes()

    def _set_pin(self, name: str, key: AdapterKey | None) -> None:
        """Move `name`'s pin to `key` (None: unpin it): the tiers hold the pinned version, and only that one."""
        self._pins.pop(name, None)
        if key is not None:
            self._pins[name] = key
            if key not in self.host:
                self._start_load(key)
            else:
                self._keep(key)  # a pin keeps it: no longer a copy for its requests only

    def _follow_current(self, name: str) -> None:
        """After a promotion: a pinned name's pin moves to its new current version."""
        if name in self._pins:
            current = self.registry.current(name)
            self._set_pin(name, None if current is None else AdapterKey(name, current))

    # ---- request references ---------------------------------------------------------------------
    def acquire(self, key: AdapterKey, keep: bool = True) -> None:
        """A request now needs `key`: count it and start loading it from disk if it is cold. keep=False: a cold
        adapter is held for its requests only (a transient host entry, dropped when the last one ends), so it
        evicts nothing there; a later acquire with keep=True makes it a cached entry. A pinned adapter is kept."""
        with self._lock:
            keep = keep or self.is_pinned(key)
            self.users[key] = self.users.get(key, 0) + 1  # the host tier never evicts it while any request does
            if self.host.get(key) is not None:  # get() also marks it most recently used
                self.metrics.hit("host")
                if keep:
                    self._keep(key)
            else:
                self.metrics.miss("host")
                self._start_load(key, keep)

    def release(self, key: AdapterKey) -> None:
        with self._lock:
            n = self.users.get(key, 0) - 1
            if n > 0:
                self.users[key] = n
                return
            self.users.pop(key, None)
            if self.registry.current(key.name) != key.version:
                self._free(key)  # superseded or unregistered: free once unused
            elif key in self.host.transient:  # held for its requests only: the tier never counted it
                self.host.drop(key)
                self.slots.invalidate_if_idle(key)  # nor should its idle device slot outlast it (a false "resident")
            self._count_evictions(self.host.shrink())  # a burst of in-use adapters may have overfilled the tier

    def evict(self, spec: AdapterSpec) -> int:
        """Drop `spec`'s versions (all of its name's, unless it names one) from the host tier now, except those a
        request uses or a pin holds. A cluster replica calls it when Ray Serve's multiplexing unclaims the adapter,
        so that the tier holds what Ray routes there. Returns how many were dropped."""
        with self._lock:
            drop = [k for k in self.host.keys() if k.name == spec.name and spec.version in (None, k.version)
                    and not self.users.get(k) and not self.is_pinned(k)]
            for key in drop:
                self.host.drop(key)
                self.metrics.evict("host")
            return len(drop)

    def prefetch(self, spec: AdapterSpec) -> AdapterKey:
        """Start loading `spec` into host memory in the background (warming a tenant before traffic)."""
        key = self.resolve(spec)
        with self._lock:
            if key not in self.host:
                self._start_load(key)
            else:
                self._keep(key)
        return key

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

    def place_pinned(self) -> list[tuple[int, AdapterKey]]:
        """Give every pinned, loaded adapter that is not resident a slot; returns (slot, key) to fill now."""
        fills = []
        with self._lock:
            for key in sorted(self._pins.values()):
                if key in self.host and key not in self.slots.slot_of:
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
                resident={"host": len(self.host), "device": len(self.slots.slot_of)},
                loading=len(self._loading),
                slot_refs=sum(self.slots.refs.values()),
                queued=queued,
                running=running,
            )

    def tiers(self) -> TierView:
        """Every device slot's occupant and the host cache's entries (LRU first), with ranks, references and pins."""
        with self._lock:
            def view(key: AdapterKey, refs: int) -> ResidentAdapter:
                weights = self.host.peek(key)
                return ResidentAdapter(key.name, key.version, None if weights is None else weights.rank, refs,
                                       self.is_pinned(key))

            slots: list[ResidentAdapter | None] = [None] * self.slots.num_slots
            for key, slot in self.slots.slot_of.items():
                slots[slot] = view(key, self.slots.refs.get(key, 0))
            host = [view(key, self.users.get(key, 0)) for key in self.host.keys()]
            return TierView(slots, host, self.host.capacity, [(k.name, k.version) for k in self._loading])

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
    def _start_load(self, key: AdapterKey, keep: bool = True) -> None:
        if keep:
            self._transient_loads.discard(key)
        if key in self._loading:
            return
        if not keep:
            self._transient_loads.add(key)
        path = self._paths.get(key)
        if path is None:
            path = self.registry.resolve(key)[1]
            self._paths[key] = path
        self._loading[key] = (self._executor.submit(self._load, key.name, path), time.perf_counter())

    def poll(self) -> dict[AdapterKey, AdapterError]:
        """Collect finished background loads; return the keys whose load failed, with their errors."""
        failed: dict[AdapterKey, AdapterError] = {}
        with self._lock:
            for key, (fut, t0) in list(self._loading.items()):
                if not fut.done():
                    continue
                del self._loading[key]
                keep = key not in self._transient_loads
                self._transient_loads.discard(key)
                err = fut.exception()
                if err is None:
                    self.metrics.load("host", time.perf_counter() - t0)
                    if keep or self.users.get(key):  # a transient load whose requests all ended is not kept
                        self._put_host(key, fut.result(), keep)
                else:
                    self.metrics.failure()
                    log.warning("adapter %s failed to load: %s", key, err)
                    failed[key] = err if isinstance(err, AdapterError) else AdapterError(f"adapter {key}: {err}")
        return failed

    def wait(self, keys: list[AdapterKey] | None = None, timeout: float = 60.0) -> None:
        """Block until the loads of `keys` (default: all) have finished; `poll()` then collects them."""
        with self._lock:
            futures = [f for k, (f, _) in self._loading.items() if keys is None or k in keys]
        deadline = time.monotonic() + timeout
        for fut in futures:
            try:
                fut.exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return

    @property
    def loading(self) -> list[AdapterKey]:
        with self._lock:
            return list(self._loading)

    def _put_host(self, key: AdapterKey, weights: AdapterWeights, keep: bool = True) -> None:
        self._count_evictions(self.host.put(key, weights, keep))

    def _keep(self, key: AdapterKey) -> None:
        """A transient host entry becomes a cached one (which may evict the least recently used); others stay."""
        if key in self.host.transient:
            self._count_evictions(self.host.keep(key))

    def _count_evictions(self, evicted: list[AdapterKey]) -> None:
        for key in evicted:
            self.metrics.evict("host")
            log.debug("evicted adapter %s from host memory", key)

    def _collect_stale(self, name: str) -> None:
        entry = self.registry.entries.get(name)
        for version in (entry.versions if entry else {}):
            key = AdapterKey(name, version)
            if entry is not None and version != entry.current and not self.users.get(key):
                self._free(key)

    def _free(self, key: AdapterKey) -> None:
        self.host.drop(key)
        self.slots.invalidate_if_idle(key)
        if key not in self._loading:
            self._paths.pop(key, None)  # resolved again (from the registry) if a request names the version later

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
