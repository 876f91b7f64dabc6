"""AdapterRegistry: adapter names -> versions -> directories, the current version, pins. No torch.

Sources: adapters named at start (name=path), an adapter root (`<root>/<name>/` is a PEFT directory,
or `<root>/<name>/<version>/` holds versions), and run-time registrations. Run-time registrations, start-up
modules (with their weights' digests), promotions, pins, unloads and the versions each name has had are
persisted to a JSON file written atomically (temp file, fsync, rename, fsync of the directory), so a crash
(kill -9, power loss) leaves either the old or the new file, never a partial one. A change is applied in memory
only once it is on disk: a failed write (a full disk) raises StateWriteError and leaves the registry as it was.

Several engines (the replicas of a cluster) may share one registry file on a shared directory: every change
takes an exclusive lock on `<file>.lock`, first merges what the others wrote (`refresh`), then writes; an
engine that only serves calls `refresh` when the file changes and applies what `take_changes` returns.
The records and the file's format, lock and atomic write are in adapters/registry_file.py.

Admin decisions stick: an unload leaves a tombstone (the name is not rediscovered under the adapter root until
an explicit registration clears it), a version once unloaded is retired (never served or handed out again), and
start-up flags (`register_startup`, rules in adapters/startup.py) never undo an admin's promotion.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters import startup
from loraplex.adapters.key import NAME_RE, AdapterKey, AdapterSpec
from loraplex.adapters.registry_file import (DEFAULT_VERSION, AdapterEntry, Tombstone, file_lock, file_stamp,
                                             read_state, remove_stale_temps, state_json, write_state)
from loraplex.adapters.registry_file import version_sort_key as _version_sort_key
from loraplex.adapters.startup import ADMIN, STARTUP
from loraplex.errors import AdapterNotFoundError, AdapterVersionExistsError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A registered adapter as /v1/models lists it (the catalog's view: no weights, no torch, so the cluster's
    ingress reads it without the engine)."""

    name: str
    current: str
    versions: tuple[str, ...]
    pinned: bool
    path: Path  # the current version's directory


class AdapterRegistry:
    def __init__(self, root: Path | None = None, state_file: Path | None = None) -> None:
        self.root = root.resolve() if root is not None else None
        self.state_file = state_file
        self.entries: dict[str, AdapterEntry] = {}
        # Every version each name has had in this process, unregistered ones included: a key (name, version) always
        # means the same weights, so requests still running on an unloaded version never share a slot or a cache
        # entry with a later registration under the same name.
        self._seen: dict[str, set[str]] = {}
        self.tombstones: dict[str, Tombstone] = {}  # names an admin unloaded (persisted, merged between engines)
        self._lock = threading.Lock()  # registrations may come from the HTTP thread and the engine thread
        self._stamp: tuple[int, int, int] | None = None  # the file as last read or written: (mtime_ns, size, inode)
        self._changed: set[str] = set()  # names another engine changed, merged by refresh, not yet taken
        if state_file is not None and state_file.is_file():
            with self._file_lock():
                self._stamp = self._file_stamp()
                self._load_state(state_file)

    # ---- lookup ---------------------------------------------------------------------------------
    def resolve(self, spec: AdapterSpec | AdapterKey) -> tuple[AdapterKey, Path]:
        """A spec (the current version if none is named) -> the version's key and directory. Raises
        AdapterNotFoundError naming where it looked."""
        name, version = spec
        with self._lock:
            entry = self.entries.get(name) or self._discover(name)
            if entry is None:
                raise self._missing(name)
            if version is None:
                version = entry.current
            path = entry.versions.get(version) or (self._discover_version(entry, version) if self.root else None)
            if path is None:
                versions = ", ".join(sorted(entry.versions, key=_version_sort_key))
                if version in self._seen.get(name, ()):
                    raise AdapterNotFoundError(
                        f"adapter {name!r} version {version!r} was unloaded and is retired: a version never comes "
                        f"back once unloaded; use another version (versions: {versions})")
                raise AdapterNotFoundError(f"adapter {name!r} has no version {version!r} (versions: {versions})")
            return AdapterKey(name, version), path

    def _missing(self, name: str) -> AdapterNotFoundError:
        """Why `name` resolves to nothing: unloaded by an admin, all its versions retired, or never there."""
        stone = self.tombstones.get(name)
        if stone is not None:
            return AdapterNotFoundError(
                f"adapter {name!r} was unloaded by an admin at {stone.when()} (POST /v1/unload_lora_adapter); load "
                "it again with POST /v1/load_lora_adapter to serve it")
        where = f"; no directory {self.root / name}" if self.root is not None else " (no --adapter-dir is set)"
        retired = self._seen.get(name)
        if retired:
            where += f"; its versions {', '.join(sorted(retired, key=_version_sort_key))} were unloaded and are retired"
        return AdapterNotFoundError(f"adapter {name!r} not found: it is not registered{where}")

    def _inside_root(self, path: Path) -> bool:
        assert self.root is not None
        try:
            return path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def _discover(self, name: str) -> AdapterEntry | None:
        """Just-in-time: find `<root>/<name>` and its versions, except a name an admin unloaded (a tombstone) and
        versions retired (every version this registry knows of that no entry holds)."""
        if self.root is None or name in self.tombstones:
            return None
        d = self.root / name
        if not d.is_dir() or not self._inside_root(d):
            return None
        entry = AdapterEntry(name)
        if (d / "adapter_config.json").is_file():
            entry.versions[DEFAULT_VERSION] = d
        for sub in d.iterdir():
            if sub.is_dir() and (sub / "adapter_config.json").is_file() and NAME_RE.match(sub.name) and self._inside_root(sub):
                entry.versions[sub.name] = sub
        for version in self._seen.get(name, ()):
            entry.versions.pop(version, None)
        if not entry.versions:
            return None
        entry.current = max(entry.versions, key=_version_sort_key)
        self.entries[name] = entry
        return entry

    def _discover_version(self, entry: AdapterEntry, version: str) -> Path | None:
        assert self.root is not None
        d = self.root / entry.name / version
        if version in self._seen.get(entry.name, ()):  # retired: unloaded once, never served again
            return None
        if (d / "adapter_config.json").is_file() and self._inside_root(d):
            entry.versions[version] = d
            return d
        return None

    def names(self) -> list[str]:
        with self._lock:
            if self.root is not None and self.root.is_dir():
                for d in self.root.iterdir():
                    if d.is_dir() and d.name not in self.entries and NAME_RE.match(d.name):
                        self._discover(d.name)  # None for a tombstoned name
            return sorted(self.entries)

    # ---- changes --------------------------------------------------------------------------------
    def register(self, spec: AdapterSpec, path: Path, promote: bool = True, persistent: bool = True,
                 digest: str | None = None) -> AdapterKey:
        """An admin's registration: add a version of spec.name (spec.version, or the next integer); make it
        current when `promote`. It clears the name's tombstone (the unload it follows). A version the name has
        or had is refused (AdapterVersionExistsError): versions are immutable. `digest`: the weights' sha256."""
        with self._lock, self._transaction():
            self.tombstones.pop(spec.name, None)
            return self._add_version(spec, path, promote, persistent, digest, ADMIN)

    def _add_version(self, spec: AdapterSpec, path: Path, promote: bool, persistent: bool, digest: str | None,
                     by: str) -> AdapterKey:
        name, version = spec
        entry = self.entries.get(name) or self._discover(name) or AdapterEntry(name)
        seen = self._seen.setdefault(name, set())
        seen.update(entry.versions)
        if version is None:
            numeric = [int(v) for v in seen if v.isdigit()]
            version = str(max(numeric, default=0) + 1)
        elif version in seen:
            raise AdapterVersionExistsError(
                f"adapter {name!r} already has (or had) version {version!r}; versions are immutable: register "
                "the new weights as another version (or leave the version out for the next number)")
        seen.add(version)
        entry.versions[version] = Path(path)
        entry.origins[version] = by
        if digest is not None:
            entry.digests[version] = digest
        if promote or len(entry.versions) == 1:
            entry.current, entry.current_by = version, by
        entry.persistent |= persistent
        self.entries[name] = entry
        return AdapterKey(name, version)

    def register_startup(self, name: str, path: Path, digest: str) -> tuple[AdapterKey | None, str]:
        """A start-up module (--lora-modules name=path, weights `digest`), under adapters/startup.py's rules: the
        same weights as a version it has are no change, other weights are a new version, current only where no
        admin chose the current one; a name an admin unloaded stays unloaded while the weights are those it had.
        Returns the version that serves these weights (None: left unloaded) and the log line saying which."""
        with self._lock, self._transaction():
            stone = self.tombstones.get(name)
            entry = self.entries.get(name) or (None if stone is not None else self._discover(name))
            decision = startup.decide(entry, stone, digest)
            if decision.keep_unloaded:
                return None, decision.message(name)
            if decision.version is not None:  # weights it has: at most the current version changes
                assert entry is not None
                if decision.promote:
                    entry.current, entry.current_by = decision.version, STARTUP
                return AdapterKey(name, decision.version), decision.message(name)
            self.tombstones.pop(name, None)  # the operator changed the weights since the unload
            key = self._add_version(AdapterSpec(name), path, decision.promote, True, digest, STARTUP)
            return key, decision.message(name, key.version)

    def drop_startup_leftovers(self, flagged: set[str]) -> list[str]:
        """After start-up registration: unregister names the start-up flags added earlier but no longer name, unless
        an admin made them theirs (startup.owned_by_flags). Their versions stay retired; no tombstone is left.
        Returns a log line per name looked at."""
        def leftovers() -> list[AdapterEntry]:
            return [e for n, e in sorted(self.entries.items()) if n not in flagged and STARTUP in e.origins.values()]

        with self._lock:
            if not leftovers():
                return []  # nothing to do: no write on an ordinary start
            with self._transaction():
                lines = []
                for entry in leftovers():
                    if startup.owned_by_flags(entry):
                        del self.entries[entry.name]
                        self._seen.setdefault(entry.name, set()).update(entry.versions)
                        lines.append(f"{entry.name}: no longer in --lora-modules, unregistered")
                    else:
                        lines.append(f"{entry.name}: no longer in --lora-modules, kept: " + startup.why_kept(entry))
                return lines

    def current(self, name: str) -> str | None:
        """The version new requests for `name` get, None if it is not registered."""
        with self._lock:
            entry = self.entries.get(name)
            return None if entry is None else entry.current

    def promote(self, name: str, version: str) -> None:
        with self._lock, self._transaction():
            entry = self.entries.get(name)
            if entry is None or version not in entry.versions:
                raise AdapterNotFoundError(f"adapter {name!r} has no registered version {version!r}")
            entry.current, entry.current_by = version, ADMIN
            entry.persistent = True

    def unregister(self, name: str) -> AdapterEntry:
        """An admin's unload: the name's versions are retired and a tombstone keeps the adapter root from serving
        the name again (here, after a restart, and on every engine sharing the registry file) until an explicit
        registration clears it."""
        with self._lock, self._transaction():
            entry = self.entries.pop(name, None) or self._discover(name)
            if entry is None:
                raise self._missing(name)
            self.entries.pop(name, None)  # a name discovered just now
            self._seen.setdefault(name, set()).update(entry.versions)
            self.tombstones[name] = Tombstone(time.time(), frozenset(entry.digests.values()))
        return entry

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._lock, self._transaction():
            entry = self.entries.get(name) or self._discover(name)
            if entry is None:
                raise self._missing(name)
            entry.pinned = pinned
            entry.persistent = True

    # ---- a registry file shared by several engines --------------------------------------------------
    def refresh(self) -> None:
        """Merge what other engines wrote to the registry file since this one last read or wrote it (a stat when
        nothing changed). The names whose versions, current version or pin changed wait in `take_changes`."""
        if self.state_file is None or self._file_stamp() == self._stamp:
            return
        with self._lock, self._file_lock():
            self._refresh_locked()

    @property
    def version(self) -> int:
        """The registry file's mtime (ns) as last read or written here: engines at the same version agree."""
        return self._stamp[0] if self._stamp is not None else 0

    def take_changes(self) -> set[str]:
        """Names changed by another engine since the last call (refresh, or a change of ours that merged first)."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return changed

    def _refresh_locked(self) -> None:
        stamp = self._file_stamp()
        if self.state_file is None or stamp == self._stamp:
            return
        ours = {n: e for n, e in self.entries.items() if e.persistent}
        theirs, seen, stones = read_state(self.state_file) if stamp is not None else ({}, {}, {})
        for name, versions in seen.items():
            self._seen.setdefault(name, set()).update(versions)
        for name, entry in theirs.items():
            old = self.entries.get(name)
            if old is not None:  # versions are immutable and never reused: the union, less the retired, is right
                retired = seen[name] - entry.versions.keys()
                entry.versions = {v: p for v, p in {**old.versions, **entry.versions}.items() if v not in retired}
            if old is None or (old.versions, old.current, old.pinned) != (entry.versions, entry.current, entry.pinned):
                self._changed.add(name)
            self._seen.setdefault(name, set()).update(entry.versions)
            self.entries[name] = entry
        # Unregistered by another engine: its persistent entries, and any entry here (one found under the adapter
        # root is not persistent) of a name it tombstoned.
        for name in (ours.keys() | (stones.keys() & self.entries.keys())) - theirs.keys():
            self._seen.setdefault(name, set()).update(self.entries.pop(name).versions)
            self._changed.add(name)
        self.tombstones = stones  # the file holds every engine's unloads, and the registrations that cleared them
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        return file_stamp(self.state_file)

    def _file_lock(self) -> AbstractContextManager[None]:
        return file_lock(self.state_file)

    # ---- persistence ----------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Run a change (under the lock), then persist it; if the change or the write fails, the entries and
        seen versions are restored, so memory never holds what the file does not."""
        with self._file_lock():
            self._refresh_locked()  # what other engines sharing the file wrote, merged before this change
            entries = {n: e.copy() for n, e in self.entries.items()}
            seen = {n: set(v) for n, v in self._seen.items()}
            stones = dict(self.tombstones)
            try:
                yield
                self._save()
            except BaseException:
                self.entries, self._seen, self.tombstones = entries, seen, stones
                raise

    def _save(self) -> None:
        if self.state_file is not None:
            # Our own write is no change to merge: the new stamp is the one we know.
            self._stamp = write_state(self.state_file, state_json(self.entries, self._seen, self.tombstones))

    def _load_state(self, path: Path) -> None:
        self.entries, seen, self.tombstones = read_state(path)
        for name, versions in seen.items():
            self._seen.setdefault(name, set()).update(versions)
        remove_stale_temps(path.parent)
