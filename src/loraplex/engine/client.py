"""EngineClient: what the HTTP server needs from an engine, as Protocols: Generation (requests), AdapterAdmin (the
admin operations of engine/admin.py) and the state the metrics and dashboard read. AsyncLLMEngine is one (the engine
in this process); the cluster's RemoteEngine is another (engine replicas behind Ray Serve handles), so the same
routes, keys, errors and streaming serve one engine or many. No torch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from loraplex.adapters.key import AdapterKey, AdapterSpec, AdapterTarget  # the last two re-exported for the server
from loraplex.adapters.registry import AdapterInfo  # ListAdapters' result, for the server (no torch: the catalog's view)
from loraplex.engine.admin import AdminOp
from loraplex.engine.outputs import EngineSnapshot, EngineStats, RequestOutput
from loraplex.engine.request import Share
from loraplex.sampling import SamplingParams

if TYPE_CHECKING:
    from loraplex.engine.facts import EngineFacts

R = TypeVar("R")


@dataclass(slots=True)
class ReplicaView:
    """One engine behind the server, as /v1/models lists it: the engine in this process, or a cluster replica."""

    id: str
    running: int
    waiting: int
    resident: dict[AdapterKey, list[str]]  # each version held -> the tiers holding it ("device", "host")
    versions: dict[str, str]  # adapter name -> its current version as this engine's registry has it
    registry_version: int = 0  # the registry file's mtime (ns) as this engine last read or wrote it; 0: no file


class EngineStream(Protocol):
    """One request's outputs in order; an error (adapter failed to load, engine gone) raises from iteration.
    `abort()` is synchronous and idempotent, so a cancelled handler can always release the request."""

    adapter: AdapterKey | None  # the adapter version the request was admitted on (None: the base model)

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    def abort(self) -> None: ...


class Generation(Protocol):
    """Requests in, outputs out: what the completion and chat routes need. A request arrives as token ids and a
    typed target (the server tokenized and parsed it once); an engine never tokenizes or parses it again."""

    async def add(self, prompt: list[int], sampling: SamplingParams | None = None, adapter: AdapterTarget = None,
                  request_id: str | None = None, cache_salt: str | None = None, share: Share | None = None
                  ) -> EngineStream: ...

    # What the engine serves, fixed at start (a cluster: max_num_seqs over every replica), and its tokenizer.
    @property
    def facts(self) -> EngineFacts: ...

    @property
    def tokenizer(self) -> Any: ...


class AdapterAdmin(Protocol):
    """What the admin routes need: every operation through one method, so an engine provides them all at once."""

    async def admin(self, op: AdminOp[R]) -> R:
        """Apply one administration operation (engine/admin.py: register, unregister, promote, pin, list) and return
        its result; for a change, once every engine sharing the registry would serve a request under it."""
        ...


class EngineClient(Generation, AdapterAdmin, Protocol):
    """Requests and administration, plus the state /metrics, /v1/models and the dashboard read."""

    async def reset_prefix_cache(self) -> int: ...

    async def snapshot(self) -> EngineSnapshot: ...

    async def replicas(self) -> list[ReplicaView]: ...

    async def stats(self) -> list[EngineStats]:
        """The dashboard's view of each engine behind the server: one for the engine in this process, one per
        live replica for a cluster (each with its `replica` id)."""
        ...

    def shutdown(self) -> None: ...
