"""AdapterRegistry: adapter names -> versions -> directories, the current version, pins. No torch.

Sources: adapters named at start (name=path), an adapter root (`<root>/<name>/` is a PEFT directory,
or `<root>/<name>/<version>/` holds versions), and run-time registrations. Run-time registrations,
promotions, pins and the versions each name has had are persisted to a JSON file written atomically
(temp file, fsync, rename, fsync of the directory), so a crash (kill -9, power loss) leaves either the
old or the new file, never a partial one. A change is applied in memory only once it is on disk: a
failed write (a full disk) raises StateWriteError and leaves the registry as it was.

Several engines (the replicas of a cluster) may share one registry file on a shared directory: every change
takes an exclusive lock on `<file>.lock`, first merges what the others wrote (`refresh`), then writes; an
engine that only serves calls `refresh` when the file changes and applies what `take_changes` returns.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraplex.adapters.key import NAME_RE, AdapterKey, AdapterSpec, validate_name
from loraplex.errors import AdapterNotFoundError, AdapterVersionExistsError, StateWriteError

log = logging.getLogger(__name__)

DEFAULT_VERSION = "1"
STALE_TEMP_SECONDS = 3600  # temp files this old are left over from a crash mid-write, not a write in progress


def _version_sort_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


@dataclass(slots=True)
class AdapterEntry:
    name: str
    versions: dict[str, Path] = field(default_factory=dict)
    current: str = DEFAULT_VERSION
    pinned: bool = False
    persistent: bool = False  # registered at run time: saved in the registry file

    def to_json(self) -> dict[str, object]:
        return {"versions": {v: str(p) for v, p in self.versions.items()}, "current": self.current,
                "pinned": self.pinned}


class AdapterRegistry:
    def __init__(self, root: Path | None = None, state_file: Path | None = None) -> None:
        self.root = root.resolve() if root is not None else None
        self.state_file = state_file
        self.entries: dict[str, AdapterEntry] = {}
        # Every version each name has had in this process, unregistered ones included: a key (name, version) always
        # means the same weights, so requests still running on an unloaded version never share a slot or a cache
        # entry with a later registration under the same name.
        self._seen: dict[str, set[str]] = {}
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
                where = f"; no directory {self.root / name}" if self.root is not None else " (no --adapter-dir is set)"
                raise AdapterNotFoundError(f"adapter {name!r} not found: it is not registered{where}")
            if version is None:
                version = entry.current
            path = entry.versions.get(version) or (self._discover_version(entry, version) if self.root else None)
            if path is None:
                raise AdapterNotFoundError(
                    f"adapter {name!r} has no version {version!r} (versions: {', '.join(sorted(entry.versions))})"
                )
            return AdapterKey(name, version), path

    def _inside_root(self, path: Path) -> bool:
        assert self.root is not None
        try:
            return path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def _discover(self, name: str) -> AdapterEntry | None:
        """Just-in-time: find `<root>/<name>` and its versions."""
        if self.root is None:
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
        if not entry.versions:
            return None
        entry.current = max(entry.versions, key=_version_sort_key)
        self.entries[name] = entry
        return entry

    def _discover_version(self, entry: AdapterEntry, version: str) -> Path | None:
        assert self.root is not None
        d = self.root / entry.name / version
        if (d / "adapter_config.json").is_file() and self._inside_root(d):
            entry.versions[version] = d
            return d
        return None

    def names(self) -> list[str]:
        with self._lock:
            if self.root is not None and self.root.is_dir():
                for d in self.root.iterdir():
                    if d.is_dir() and d.name not in self.entries and NAME_RE.match(d.name):
                        self._discover(d.name)
            return sorted(self.entries)

    # ---- changes --------------------------------------------------------------------------------
    def register(self, spec: AdapterSpec, path: Path, promote: bool = True, persistent: bool = True) -> AdapterKey:
        """Add a version of spec.name (spec.version, or the next integer); make it current when `promote`.
        A version the name has or had is refused (AdapterVersionExistsError): versions are immutable."""
        name, version = spec
        with self._lock, self._transaction():
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
            if promote or len(entry.versions) == 1:
                entry.current = version
            entry.persistent |= persistent
            self.entries[name] = entry
        return AdapterKey(name, version)

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
            entry.current = version
            entry.persistent = True

    def unregister(self, name: str) -> AdapterEntry:
        with self._lock, self._transaction():
            entry = self.entries.pop(name, None)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
            self._seen.setdefault(name, set()).update(entry.versions)
        return entry

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._lock, self._transaction():
            entry = self.entries.get(name) or self._discover(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
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
        theirs, seen = self._read_state(self.state_file) if stamp is not None else ({}, {})
        for name, versions in seen.items():
            self._seen.setdefault(name, set()).update(versions)
        for name, entry in theirs.items():
            old = self.entries.get(name)
            if old is not None:  # versions are immutable and never reused: the union is still right
                entry.versions = {**old.versions, **entry.versions}
            if old is None or (old.versions, old.current, old.pinned) != (entry.versions, entry.current, entry.pinned):
                self._changed.add(name)
            self._seen.setdefault(name, set()).update(entry.versions)
            self.entries[name] = entry
        for name in ours.keys() - theirs.keys():  # unregistered by another engine
            self._seen.setdefault(name, set()).update(self.entries.pop(name).versions)
            self._changed.add(name)
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.state_file)  # type: ignore[arg-type]
        except (OSError, TypeError):
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive lock across processes (flock on <file>.lock): no engine's change overwrites another's."""
        if self.state_file is None:
            yield
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state_file.with_name(self.state_file.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- persistence ----------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Run a change (under the lock), then persist it; if the change or the write fails, the entries and
        seen versions are restored, so memory never holds what the file does not."""
        with self._file_lock():
            self._refresh_locked()  # what other engines sharing the file wrote, merged before this change
            entries = {n: replace(e, versions=dict(e.versions)) for n, e in self.entries.items()}
            seen = {n: set(v) for n, v in self._seen.items()}
            try:
                yield
                self._save()
            except BaseException:
                self.entries, self._seen = entries, seen
                raise

    def _save(self) -> None:
        if self.state_file is None:
            return
        retired = {n: sorted(v - set(self.entries[n].versions if n in self.entries else ()), key=_version_sort_key)
                   for n, v in sorted(self._seen.items())}
        state = {"adapters": {n: e.to_json() for n, e in sorted(self.entries.items()) if e.persistent},
                 "retired": {n: v for n, v in retired.items() if v}}  # versions never to be reused
        directory = self.state_file.parent
        tmp: str | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".registry-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
            tmp = None
            self._stamp = self._file_stamp()  # our own write is no change to merge
            dir_fd = os.open(directory, os.O_RDONLY)  # the rename itself survives a power loss once this is synced
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StateWriteError(
                f"could not save the adapter registry {self.state_file}: {e.strerror or e}; the change was not "
                "applied" + (" (free space on that disk, then retry)" if full else ""), disk_full=full) from e
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    @staticmethod
    def _read_state(path: Path) -> tuple[dict[str, AdapterEntry], dict[str, set[str]]]:
        """The file's adapters, and per name every version it has had (retired ones included)."""
        entries: dict[str, AdapterEntry] = {}
        seen: dict[str, set[str]] = {}
        try:
            state = json.loads(path.read_text())
            for name, data in state.get("adapters", {}).items():
                versions = {v: Path(p) for v, p in data["versions"].items()}
                entries[validate_name(name)] = AdapterEntry(
                    name, versions, data.get("current", DEFAULT_VERSION), bool(data.get("pinned")), persistent=True)
                seen.setdefault(name, set()).update(versions)
            for name, retired in state.get("retired", {}).items():
                seen.setdefault(validate_name(name), set()).update(str(v) for v in retired)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AdapterNotFoundError(f"adapter registry {path} is unreadable: {e}") from e
        return entries, seen

    def _load_state(self, path: Path) -> None:
        self.entries, seen = self._read_state(path)
        for name, versions in seen.items():
            self._seen.setdefault(name, set()).update(versions)
        now = time.time()
        for tmp in path.parent.glob(".registry-*.tmp"):  # a crash mid-write leaves its temp file behind
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
            except OSError:
                pass
