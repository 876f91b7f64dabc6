"""AdapterRegistry: adapter names -> versions -> directories, the current version, pins. No torch.

Sources: adapters named at start (name=path), an adapter root (`<root>/<name>/` is a PEFT directory,
or `<root>/<name>/<version>/` holds versions), and run-time registrations. Run-time registrations,
promotions and pins are persisted to a JSON file written atomically (temp file, fsync, rename),
so a crash never leaves a partial registry.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.key import NAME_RE, AdapterKey, AdapterSpec, validate_name
from loraplex.errors import AdapterNotFoundError, AdapterVersionExistsError

log = logging.getLogger(__name__)

DEFAULT_VERSION = "1"


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
        if state_file is not None and state_file.is_file():
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
        with self._lock:
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
            self._save()
            return AdapterKey(name, version)

    def current(self, name: str) -> str | None:
        """The version new requests for `name` get, None if it is not registered."""
        with self._lock:
            entry = self.entries.get(name)
            return None if entry is None else entry.current

    def promote(self, name: str, version: str) -> None:
        with self._lock:
            entry = self.entries.get(name)
            if entry is None or version not in entry.versions:
                raise AdapterNotFoundError(f"adapter {name!r} has no registered version {version!r}")
            entry.current = version
            entry.persistent = True
            self._save()

    def unregister(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
            self._seen.setdefault(name, set()).update(entry.versions)
            self._save()
            return entry

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._lock:
            entry = self.entries.get(name) or self._discover(name)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
            entry.pinned = pinned
            entry.persistent = True
            self._save()

    # ---- persistence ----------------------------------------------------------------------------
    def _save(self) -> None:
        if self.state_file is None:
            return
        state = {"adapters": {n: e.to_json() for n, e in sorted(self.entries.items()) if e.persistent}}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=".registry-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load_state(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
            for name, data in state.get("adapters", {}).items():
                versions = {v: Path(p) for v, p in data["versions"].items()}
                self.entries[validate_name(name)] = AdapterEntry(
                    name, versions, data.get("current", DEFAULT_VERSION), bool(data.get("pinned")), persistent=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AdapterNotFoundError(f"adapter registry {path} is unreadable: {e}") from e
