"""AdapterManager: the one owner of adapter state and the only API the engine uses for adapters. It is the catalog
(the registry: names, versions, pins, what an admin decided) over the engine's holdings (adapters/holdings.py: the
request references, the host tier, the device slots and the disk loads, one Residency record per version): each
registry change, made here or by another engine sharing the registry file, is applied to what is held, under the
holdings' lock. Disk reads and validation run on a loader thread, or, for a registration, on the caller's thread,
never on the engine's step loop; a version superseded by a promotion is freed once its last request finishes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from loraplex.adapters.holdings import Holdings
from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.loads import Loader
from loraplex.adapters.registry import AdapterInfo, AdapterRegistry
from loraplex.adapters.residency import HostAdmission, admit_all
from loraplex.errors import InvalidRequestError

log = logging.getLogger(__name__)


class AdapterManager(Holdings):
    def __init__(self, registry: AdapterRegistry, num_slots: int, host_capacity: int, loader: Loader,
                 admits: HostAdmission = admit_all) -> None:
        """`admits`: the host tier's admission policy (adapters/residency.py); call `readmit()` when it changes."""
        super().__init__(num_slots, host_capacity, loader, admits)
        self.registry = registry
        for name, entry in registry.entries.items():
            if entry.pinned:
                self._set_pin(name, AdapterKey(name, entry.current))

    def _locate(self, key: AdapterKey) -> Path:
        return self.registry.resolve(key)[1]

    def _is_current(self, key: AdapterKey) -> bool:
        return self.registry.current(key.name) == key.version

    # ---- names and versions ---------------------------------------------------------------------
    def resolve(self, spec: AdapterSpec | AdapterKey) -> AdapterKey:
        """The version a new request for `spec` runs on (the current one unless the spec names a version)."""
        key, path = self.registry.resolve(spec)
        with self._lock:
            self.table[key].path = path  # registered versions only (an unknown name raised): a bounded set
        return key

    def register(self, spec: AdapterSpec, path: Path, promote: bool = True, persistent: bool = True) -> AdapterKey:
        """Load and validate now (in the caller's thread, outside the lock: decoding goes on), then register;
        the previous version is freed once its requests finish. Returns the new version's key."""
        t0 = time.perf_counter()
        weights = self.loads.load(spec.name, Path(path))  # raises a named AdapterError; nothing registered then
        with self._lock:
            key = self.registry.register(spec, Path(path), promote, persistent, weights.digest.hex() or None)
            self.metrics.load("host", time.perf_counter() - t0)
            self.table[key].path = Path(path)
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
            weights = self.loads.load(name, path)  # a bad module fails the start, naming it
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
                    if not self._users(key):
                        self._free(key)
                continue
            self._set_pin(name, AdapterKey(name, entry.current) if entry.pinned else None)
            self._collect_stale(name)
        return names

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
                if not self._users(key):
                    self._free(key)
            self._apply_changes()

    def _free_unregistered(self) -> None:
        """Unpin and free (where no request uses them) the versions held of names the registry no longer has."""
        for name in [n for n in self._pinned_names() if n not in self.registry.entries]:
            self._set_pin(name, None)
        for key in [*self.host.keys(), *self.slots.resident()]:
            if key.name not in self.registry.entries and not self._users(key):
                self._free(key)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep `name`'s current version in a device slot (loaded in the background if needed); the pin follows
        later promotions. One slot always stays unpinned, for everyone else."""
        key = self.resolve(AdapterSpec(name))
        with self._lock:
            if pinned and len(self._pinned_names() | {name}) >= self.slots.num_slots:
                raise InvalidRequestError(
                    f"cannot pin {name!r}: at most {self.slots.num_slots - 1} adapters may be pinned with "
                    f"--max-loras {self.slots.num_slots}; raise --max-loras"
                )
            self.registry.set_pinned(name, pinned)
            self._set_pin(name, key if pinned else None)
            self._apply_changes()

    def _follow_current(self, name: str) -> None:
        """After a promotion: a pinned name's pin moves to its new current version."""
        if name in self._pinned_names():
            current = self.registry.current(name)
            self._set_pin(name, None if current is None else AdapterKey(name, current))

    def prefetch(self, spec: AdapterSpec | AdapterKey) -> AdapterKey:
        """Start loading `spec` into host memory in the background (warming a tenant before traffic)."""
        key = self.resolve(spec)
        with self._lock:
            if key not in self.host:
                self._start_load(key)
        return key

    def _collect_stale(self, name: str) -> None:
        entry = self.registry.entries.get(name)
        for version in (entry.versions if entry else {}):
            key = AdapterKey(name, version)
            if entry is not None and version != entry.current and not self._users(key):
                self._free(key)
