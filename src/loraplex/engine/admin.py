"""Adapter administration as data. Each operation the admin routes offer (register, unregister, promote, pin, list),
and each hook a cluster replica runs on its own engine (prefetch, residency, registry sync, readmission), is one
message here, declared once and implemented once, over the AdapterManager (`run`). An engine provides all of them
through one method, `admin(op)` (engine/client.py AdapterAdmin):
- LLMEngine runs the op in the caller's thread;
- AsyncLLMEngine runs it where its `runs_on` says: on a worker thread when it reads the disk, on the engine thread
  between steps, or at once in the caller when it only reads state under the manager's lock;
- the cluster's RemoteEngine sends it to one replica (plain data across Ray) and, when it changes the registry,
  returns once every replica has read the change.
An op's names and versions are validated when it is made, so it arrives typed at every engine. No torch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, TypeVar

from loraplex.adapters.key import AdapterKey, AdapterSpec, parse_target, validate_name
from loraplex.adapters.registry import AdapterInfo
from loraplex.errors import LoraplexError

if TYPE_CHECKING:
    from loraplex.adapters.manager import AdapterManager

R = TypeVar("R")
# Where AsyncLLMEngine runs an op: "worker", a worker thread (it reads files or scans a directory: decoding goes on);
# "engine", the engine thread between steps; "caller", at once (it only reads state, under the manager's lock).
RunsOn = Literal["worker", "engine", "caller"]


class AdminOp(ABC, Generic[R]):
    """One administration operation; `run` returns what the caller gets back (R)."""

    __slots__ = ()
    runs_on: ClassVar[RunsOn] = "engine"
    changes: ClassVar[bool] = True  # changes the registry: every engine sharing it must read the change

    @abstractmethod
    def run(self, adapters: AdapterManager) -> R:
        """Apply the operation to this engine's adapters (any thread: the manager's lock orders it)."""


class LocalOp(AdminOp[R]):
    """An operation on this engine alone: it writes nothing to the registry other engines read."""

    __slots__ = ()
    changes: ClassVar[bool] = False


def _check(name: str, version: str | None = None) -> None:
    """An op's name and version are validated when it is made (in the route, before it reaches any engine)."""
    validate_name(name)
    if version is not None:
        validate_name(version, "adapter version")


@dataclass(frozen=True, slots=True)
class Register(AdminOp[AdapterKey]):
    """Load, validate and register a version of `name` (the next integer when `version` is None), promoted unless
    `promote` is False. Requests already running keep their version; new ones get the promoted one. Returns the key
    of the version registered, once it is servable."""

    name: str
    path: str | Path
    version: str | None = None
    promote: bool = True
    runs_on: ClassVar[RunsOn] = "worker"

    def __post_init__(self) -> None:
        _check(self.name, self.version)

    def run(self, adapters: AdapterManager) -> AdapterKey:
        return adapters.register(AdapterSpec(self.name, self.version), Path(self.path), self.promote)


@dataclass(frozen=True, slots=True)
class Unregister(AdminOp[None]):
    """New requests for `name` get 404; running ones finish; its weights are freed once unused."""

    name: str

    def __post_init__(self) -> None:
        _check(self.name)

    def run(self, adapters: AdapterManager) -> None:
        adapters.unregister(self.name)


@dataclass(frozen=True, slots=True)
class Promote(AdminOp[None]):
    """New requests for `name` run on `version` (a registered one); running ones keep theirs."""

    name: str
    version: str

    def __post_init__(self) -> None:
        _check(self.name, self.version)

    def run(self, adapters: AdapterManager) -> None:
        adapters.promote(self.name, self.version)


@dataclass(frozen=True, slots=True)
class Pin(AdminOp[None]):
    """Keep `name`'s current version in a device slot (the pin follows promotions), or release that pin."""

    name: str
    pinned: bool = True

    def __post_init__(self) -> None:
        _check(self.name)

    def run(self, adapters: AdapterManager) -> None:
        adapters.pin(self.name, self.pinned)


@dataclass(frozen=True, slots=True)
class ListAdapters(LocalOp[list[AdapterInfo]]):
    """Every adapter registered or found under the adapter root (a directory scan)."""

    runs_on: ClassVar[RunsOn] = "worker"

    def run(self, adapters: AdapterManager) -> list[AdapterInfo]:
        return adapters.catalog()


# ---- a cluster replica's hooks into its own engine (cluster/replica.py) ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Prefetch(LocalOp[AdapterKey]):
    """Resolve `model` (AdapterNotFoundError if unknown) and start loading its version into host memory in the
    background, so the first request finds it loading or loaded (a replica claiming an adapter)."""

    model: str | AdapterSpec | AdapterKey
    runs_on: ClassVar[RunsOn] = "worker"

    def run(self, adapters: AdapterManager) -> AdapterKey:
        return adapters.prefetch(parse_target(self.model))  # Ray's multiplexed model id is text: parsed here, once


@dataclass(frozen=True, slots=True)
class IsResident(LocalOp[bool]):
    """Whether the version a request for `model` would run on is in memory now (host or device)."""

    model: AdapterSpec | AdapterKey
    runs_on: ClassVar[RunsOn] = "caller"

    def run(self, adapters: AdapterManager) -> bool:
        try:
            key = adapters.resolve(self.model)
        except LoraplexError:
            return False
        return adapters.in_memory(key)  # every request on a cluster asks: one record, not every version's


@dataclass(frozen=True, slots=True)
class SyncRegistry(LocalOp[list[str]]):
    """Apply what other engines sharing the registry file changed, as if made here; returns the names changed."""

    runs_on: ClassVar[RunsOn] = "worker"

    def run(self, adapters: AdapterManager) -> list[str]:
        return adapters.sync()


@dataclass(frozen=True, slots=True)
class Readmit(LocalOp[int]):
    """The host admission policy changed (a replica's claims did): drop from host memory what it no longer caches,
    except versions a request uses or a pin holds; returns how many were dropped."""

    runs_on: ClassVar[RunsOn] = "caller"

    def run(self, adapters: AdapterManager) -> int:
        return adapters.readmit()


@dataclass(frozen=True, slots=True)
class RegistryVersion(LocalOp[int]):
    """The registry file's mtime (ns) as this engine last read or wrote it (0 without a file): a cluster waits until
    every replica's is at least the one a change wrote."""

    runs_on: ClassVar[RunsOn] = "caller"

    def run(self, adapters: AdapterManager) -> int:
        return adapters.registry.version
