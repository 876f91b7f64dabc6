"""AdapterManager: the adapter lifecycle across tiers — disk -> host (LRU) -> device slots.

Disk reads and validation run on a loader thread, never on the engine's step loop; the engine
calls `poll()` between steps to collect finished loads, and copies host weights into device slots
between steps. Reference counts (requests queued or running) protect adapters from eviction; a
version superseded by a promotion is freed once its last request finishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.metrics import AdapterMetrics, AdapterStats
from loraplex.adapters.peft_format import AdapterWeights
from loraplex.adapters.registry import AdapterRegistry, adapter_key, parse_spec
from loraplex.adapters.slots import SlotTable
from loraplex.errors import AdapterError, InvalidRequestError

log = logging.getLogger(__name__)

Loader = Callable[[str, Path], AdapterWeights]


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, slots: SlotTable, host_capacity: int, loader: Loader) -> None:
        self.registry = registry
        self.slots = slots
        self.host: HostCache[AdapterWeights] = HostCache(host_capacity)
        self.metrics = AdapterMetrics()
        self._load = loader
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-adapter-loader")
        self._loading: dict[str, tuple[Future[AdapterWeights], float]] = {}
        self._paths: dict[str, Path] = {}
        self.users: dict[str, int] = {}  # key -> requests queued or running on it
        for name, entry in registry.entries.items():
            if entry.pinned:
                self._pin_key(adapter_key(name, entry.current))

    # ---- names and versions ---------------------------------------------------------------------
    def resolve(self, spec: str) -> str:
        """'name' or 'name@version' -> key 'name@version' of the version a new request uses."""
        name, version, path = self.registry.resolve(spec)
        key = adapter_key(name, version)
        with self._lock:
            self._paths[key] = path
        return key

    def register(self, name: str, path: Path, version: str | None = None, promote: bool = True,
                 persistent: bool = True) -> str:
        """Load and validate now (in the caller's thread), then register; the previous version is freed
        once its requests finish. Returns the new key."""
        parse_spec(name)
        t0 = time.perf_counter()
        weights = self._load(name, Path(path))  # raises a named AdapterError; nothing registered then
        version = self.registry.register(name, Path(path), version, promote, persistent)
        key = adapter_key(name, version)
        with self._lock:
            self.metrics.load("host", time.perf_counter() - t0)
            self._paths[key] = Path(path)
            self.slots.invalidate_if_idle(key)  # an older copy of this key may sit in a device slot
            self._put_host(key, weights)
            if promote:
                self._collect_stale(name)
        return key

    def promote(self, name: str, version: str) -> None:
        self.registry.promote(name, version)
        with self._lock:
            self._collect_stale(name)

    def unregister(self, name: str) -> None:
        entry = self.registry.unregister(name)
        with self._lock:
            for version in entry.versions:
                key = adapter_key(name, version)
                self.host.pinned.discard(key)
                self.slots.pinned.discard(key)
                if not self.users.get(key):
                    self._free(key)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep `name`'s current version in a device slot (loaded in the background if needed)."""
        key = self.resolve(name)
        with self._lock:
            if pinned and len(self.slots.pinned | {key}) >= self.slots.num_slots:
                raise InvalidRequestError(
                    f"cannot pin {name!r}: at most {self.slots.num_slots - 1} adapters may be pinned with "
                    f"--max-loras {self.slots.num_slots}; raise --max-loras"
                )
            self.registry.set_pinned(name, pinned)
            if pinned:
                self._pin_key(key)
            else:
                self.host.pinned.discard(key)
                self.slots.pinned.discard(key)

    def _pin_key(self, key: str) -> None:
        self.host.pinned.add(key)
        self.slots.pinned.add(key)
        if key not in self.host:
            self._start_load(key)

    # ---- request references ---------------------------------------------------------------------
    def acquire(self, key: str) -> None:
        """A request now needs `key`: count it and start loading it from disk if it is cold."""
        with self._lock:
            self.users[key] = self.users.get(key, 0) + 1
            if self.users[key] == 1:
                self.host.ref(key)  # one host reference while any request uses the adapter
            if self.host.get(key) is not None:  # get() also marks it most recently used
                self.metrics.hit("host")
            else:
                self.metrics.miss("host")
                self._start_load(key)

    def release(self, key: str) -> None:
        with self._lock:
            n = self.users.get(key, 0) - 1
            if n > 0:
                self.users[key] = n
                return
            self.users.pop(key, None)
            self.host.unref(key)
            name, _, version = key.partition("@")
            entry = self.registry.entries.get(name)
            if entry is None or entry.current != version:
                self._free(key)  # superseded or unregistered: free once unused
            for _ in self.host.shrink():  # a burst of in-use adapters may have overfilled the tier
                self.metrics.evict("host")

    def prefetch(self, spec: str) -> str:
        """Start loading `spec` into host memory in the background (warming a tenant before traffic)."""
        key = self.resolve(spec)
        with self._lock:
            if key not in self.host:
                self._start_load(key)
        return key

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
                queued=queued,
                running=running,
            )

    def ready(self, key: str) -> bool:
        return key in self.host

    def weights(self, key: str) -> AdapterWeights:
        w = self.host.get(key)
        if w is None:
            raise KeyError(key)
        return w

    def pinned_keys(self) -> list[str]:
        return sorted(self.slots.pinned)

    # ---- loading --------------------------------------------------------------------------------
    def _start_load(self, key: str) -> None:
        if key in self._loading:
            return
        name = key.partition("@")[0]
        path = self._paths.get(key)
        if path is None:
            path = self.registry.resolve(key)[2]
            self._paths[key] = path
        self._loading[key] = (self._executor.submit(self._load, name, path), time.perf_counter())

    def poll(self) -> dict[str, AdapterError]:
        """Collect finished background loads; return the keys whose load failed, with their errors."""
        failed: dict[str, AdapterError] = {}
        with self._lock:
            for key, (fut, t0) in list(self._loading.items()):
                if not fut.done():
                    continue
                del self._loading[key]
                err = fut.exception()
                if err is None:
                    self.metrics.load("host", time.perf_counter() - t0)
                    self._put_host(key, fut.result())
                else:
                    self.metrics.failure()
                    log.warning("adapter %s failed to load: %s", key, err)
                    failed[key] = err if isinstance(err, AdapterError) else AdapterError(f"adapter {key}: {err}")
        return failed

    def wait(self, keys: list[str] | None = None, timeout: float = 60.0) -> None:
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
    def loading(self) -> list[str]:
        return list(self._loading)

    def _put_host(self, key: str, weights: AdapterWeights) -> None:
        for evicted in self.host.put(key, weights):
            self.metrics.evict("host")
            log.debug("evicted adapter %s from host memory", evicted)

    def _collect_stale(self, name: str) -> None:
        entry = self.registry.entries.get(name)
        for version in (entry.versions if entry else {}):
            key = adapter_key(name, version)
            if entry is not None and version != entry.current and not self.users.get(key):
                self._free(key)

    def _free(self, key: str) -> None:
        self.host.drop(key)
        self.slots.invalidate_if_idle(key)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
