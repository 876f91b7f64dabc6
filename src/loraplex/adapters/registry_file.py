"""The adapter registry's records and its file: what an entry and a tombstone hold, and how the JSON file is
read, locked across processes and written atomically (temp file, fsync, rename, fsync of the directory). No torch.

The file: {"adapters": {name: entry}, "retired": {name: [versions never to be reused]},
"tombstones": {name: {"at": unix time, "digests": [sha256 hex]}}}.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraplex.adapters.key import validate_name
from loraplex.adapters.startup import ADMIN
from loraplex.errors import AdapterNotFoundError, StateWriteError

DEFAULT_VERSION = "1"
DIRECTORY = "directory"  # a current version chosen by the adapter root's layout (the highest), not by a person
STALE_TEMP_SECONDS = 3600  # temp files this old are left over from a crash mid-write, not a write in progress

Stamp = tuple[int, int, int]  # (mtime_ns, size, inode): the file as last read or written


def version_sort_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


@dataclass(slots=True)
class AdapterEntry:
    name: str
    versions: dict[str, Path] = field(default_factory=dict)
    current: str = DEFAULT_VERSION
    pinned: bool = False
    persistent: bool = False  # registered at run time: saved in the registry file
    digests: dict[str, str] = field(default_factory=dict)  # version -> sha256 (hex) of its weights when registered
    origins: dict[str, str] = field(default_factory=dict)  # version -> ADMIN or STARTUP (absent: found under the root)
    current_by: str = DIRECTORY  # who made `current` current: start-up flags never override ADMIN

    def to_json(self) -> dict[str, object]:
        return {"versions": {v: str(p) for v, p in self.versions.items()}, "current": self.current,
                "pinned": self.pinned, "digests": self.digests, "origins": self.origins, "current_by": self.current_by}

    def copy(self) -> AdapterEntry:
        return replace(self, versions=dict(self.versions), digests=dict(self.digests), origins=dict(self.origins))


@dataclass(frozen=True, slots=True)
class Tombstone:
    """An admin unloaded the name: directory discovery skips it until an explicit registration clears it."""

    at: float  # unix time of the unload
    digests: frozenset[str]  # the weights its versions had: start-up flags with these weights leave it unloaded

    def to_json(self) -> dict[str, object]:
        return {"at": self.at, "digests": sorted(self.digests)}

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))


def file_stamp(path: Path | None) -> Stamp | None:
    try:
        st = os.stat(path)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock across processes (flock on <file>.lock): no engine's change overwrites another's."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def state_json(entries: dict[str, AdapterEntry], seen: dict[str, set[str]],
               tombstones: dict[str, Tombstone]) -> dict[str, object]:
    """What the file holds: persistent entries, retired versions (seen, not held), tombstones."""
    retired = {n: sorted(v - set(entries[n].versions if n in entries else ()), key=version_sort_key)
               for n, v in sorted(seen.items())}
    return {"adapters": {n: e.to_json() for n, e in sorted(entries.items()) if e.persistent},
            "retired": {n: v for n, v in retired.items() if v},  # versions never to be reused
            "tombstones": {n: t.to_json() for n, t in sorted(tombstones.items())}}


def write_state(path: Path, state: dict[str, object]) -> Stamp | None:
    """Replace the file atomically; returns its new stamp. A failed write raises StateWriteError (disk_full for
    ENOSPC/EDQUOT) and leaves the old file and no temp file."""
    directory = path.parent
    tmp: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".registry-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        stamp = file_stamp(path)
        dir_fd = os.open(directory, os.O_RDONLY)  # the rename itself survives a power loss once this is synced
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return stamp
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise StateWriteError(
            f"could not save the adapter registry {path}: {e.strerror or e}; the change was not "
            "applied" + (" (free space on that disk, then retry)" if full else ""), disk_full=full) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def read_state(path: Path) -> tuple[dict[str, AdapterEntry], dict[str, set[str]], dict[str, Tombstone]]:
    """The file's adapters, per name every version it has had (retired ones included), and its tombstones.
    A file written before origins were recorded: its entries were an admin's (only those were saved)."""
    entries: dict[str, AdapterEntry] = {}
    seen: dict[str, set[str]] = {}
    stones: dict[str, Tombstone] = {}
    try:
        state = json.loads(path.read_text())
        for name, data in state.get("adapters", {}).items():
            versions = {v: Path(p) for v, p in data["versions"].items()}
            entries[validate_name(name)] = AdapterEntry(
                name, versions, data.get("current", DEFAULT_VERSION), bool(data.get("pinned")), persistent=True,
                digests={str(v): str(d) for v, d in data.get("digests", {}).items()},
                origins={str(v): str(o) for v, o in data.get("origins", dict.fromkeys(versions, ADMIN)).items()},
                current_by=str(data.get("current_by", ADMIN)))
            seen.setdefault(name, set()).update(versions)
        for name, retired in state.get("retired", {}).items():
            seen.setdefault(validate_name(name), set()).update(str(v) for v in retired)
        for name, t in state.get("tombstones", {}).items():
            stones[validate_name(name)] = Tombstone(float(t["at"]), frozenset(str(d) for d in t["digests"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterNotFoundError(f"adapter registry {path} is unreadable: {e}") from e
    return entries, seen, stones


def remove_stale_temps(directory: Path) -> None:
    """A crash mid-write leaves its temp file behind; one this old is no write in progress."""
    now = time.time()
    for tmp in directory.glob(".registry-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass
