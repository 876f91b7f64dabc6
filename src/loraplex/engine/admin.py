"""Adapter administration as data. Each operation the admin routes offer (register, unregister, promote, pin, list)
is one message here, declared once and implemented once, over the AdapterManager (`run`). An engine provides all of
them through one method, `admin(op)` (engine/client.py AdapterAdmin):
- LLMEngine runs the op in the caller's thread;
- AsyncLLMEngine runs it on a worker thread when it reads the disk, else on the engine thread between steps;
- the cluster's RemoteEngine sends it to one replica (plain data across Ray) and, when it changes the registry,
  returns once every replica has read the change.
Names and versions are validated here, once for every engine. No torch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from loraplex.adapters.key import AdapterKey, AdapterSpec, validate_name
from loraplex.adapters.registry import AdapterInfo

if TYPE_CHECKING:
    from loraplex.adapters.manager import AdapterManager

R = TypeVar("R")


class AdminOp(ABC, Generic[R]):
    """One administration operation; `run` returns what the caller gets back (R)."""

    __slots__ = ()
    reads_disk: ClassVar[bool] = False  # reads files or scans a directory: run off the engine thread
    changes: ClassVar[bool] = True  # changes the registry: every engine sharing it must read the change

    @abstractmethod
    def run(self, adapters: AdapterManager) -> R:
        """Apply the operation to this engine's adapters (any thread: the manager's lock orders it)."""


@dataclass(frozen=True, slots=True)
class Register(AdminOp[AdapterKey]):
    """Load, validate and register a version of `name` (the next integer when `version` is None), promoted unless
    `promote` is False. Requests already running keep their version; new ones get the promoted one. Returns the key
    of the version registered, once it is servable."""

    name: str
    path: str | Path
    version: str | None = None
    promote: bool = True
    reads_disk: ClassVar[bool] = True

    def run(self, adapters: AdapterManager) -> AdapterKey:
        version = None if self.version is None else validate_name(self.version, "adapter version")
        return adapters.register(AdapterSpec(validate_name(self.name), version), Path(self.path), self.promote)


@dataclass(frozen=True, slots=True)
class Unregister(AdminOp[None]):
    """New requests for `name` get 404; running ones finish; its weights are freed once unused."""

    name: str

    def run(self, adapters: AdapterManager) -> None:
        adapters.unregister(validate_name(self.name))


@dataclass(frozen=True, slots=True)
class Promote(AdminOp[None]):
    """New requests for `name` run on `version` (a registered one); running ones keep theirs."""

    name: str
    version: str

    def run(self, adapters: AdapterManager) -> None:
        adapters.promote(validate_name(self.name), validate_name(self.version, "adapter version"))


@dataclass(frozen=True, slots=True)
class Pin(AdminOp[None]):
    """Keep `name`'s current version in a device slot (the pin follows promotions), or release that pin."""

    name: str
    pinned: bool = True

    def run(self, adapters: AdapterManager) -> None:
        adapters.pin(validate_name(self.name), self.pinned)


@dataclass(frozen=True, slots=True)
class ListAdapters(AdminOp[list[AdapterInfo]]):
    """Every adapter registered or found under the adapter root (a directory scan)."""

    reads_disk: ClassVar[bool] = True
    changes: ClassVar[bool] = False

    def run(self, adapters: AdapterManager) -> list[AdapterInfo]:
        return adapters.catalog()
