"""EngineClient: what the HTTP server needs from an engine, as a Protocol. AsyncLLMEngine is one (the engine in
this process); the cluster's RemoteEngine is another (engine replicas behind Ray Serve handles), so the same
routes, keys, errors and streaming serve one engine or many. No torch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.engine.outputs import EngineSnapshot, EngineStats, ReplicaView, RequestOutput
from loraplex.sampling import SamplingParams

if TYPE_CHECKING:
    from loraplex.adapters.manager import AdapterInfo
    from loraplex.engine.memory import MemoryPlan
    from loraplex.hardware import DtypeChoice


class EngineStream(Protocol):
    """One request's outputs in order; an error (adapter failed to load, engine gone) raises from iteration.
    `abort()` is synchronous and idempotent, so a cancelled handler can always release the request."""

    adapter: AdapterKey | None  # the adapter version the request was admitted on (None: the base model)

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    def abort(self) -> None: ...


class EngineClient(Protocol):
    async def add(self, prompt: str | list[int], sampling: SamplingParams | None = None, adapter: str | None = None,
                  request_id: str | None = None, cache_salt: str | None = None) -> EngineStream: ...

    @staticmethod
    def adapter_spec(model: str) -> AdapterSpec: ...

    async def register_adapter(self, name: str, path: str | Path, version: str | None = None,
                               promote: bool = True) -> AdapterKey: ...

    async def unregister_adapter(self, name: str) -> None: ...

    async def promote_adapter(self, name: str, version: str) -> None: ...

    async def pin_adapter(self, name: str, pinned: bool) -> None: ...

    async def list_adapters(self) -> list[AdapterInfo]: ...

    async def reset_prefix_cache(self) -> int: ...

    async def snapshot(self) -> EngineSnapshot: ...

    async def replicas(self) -> list[ReplicaView]: ...

    async def stats(self) -> list[EngineStats]:
        """The dashboard's view of each engine behind the server: one for the engine in this process, one per
        live replica for a cluster (each with its `replica` id)."""
        ...

    def shutdown(self) -> None: ...

    # The model's facts, fixed at start.
    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_name(self) -> str: ...

    @property
    def model_dir(self) -> Path: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def max_num_seqs(self) -> int: ...

    @property
    def dtype(self) -> DtypeChoice: ...

    @property
    def device(self) -> str: ...

    @property
    def memory(self) -> MemoryPlan: ...

    @property
    def max_prepare_seconds(self) -> float:
        """The cap on one request's chat templating, tokenization and grammar compilation (--max-prepare-seconds)."""
        ...
