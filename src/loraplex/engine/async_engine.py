"""AsyncLLMEngine: runs LLMEngine's step loop on one background thread and streams outputs to asyncio; the
whole API the HTTP server uses (requests, adapter administration, the model's facts, snapshots for metrics).

A request is prepared first (validated, tokenized, its grammar compiled: engine/prepare.py Preparer) on a small pool of
worker threads under --max-prepare-seconds (engine/prepare.py), then admitted, like aborts and adapter changes,
on the engine thread between steps, submitted through `call`; errors come back to the awaiting coroutine. An
adapter registration reads and validates the files on a worker thread so decoding goes on meanwhile; the
AdapterManager's lock orders its bookkeeping against the engine thread's. The event loop never runs model work,
templating or tokenization, so one process serves many concurrent clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from loraplex.adapters.key import AdapterKey, AdapterTarget, parse_target
from loraplex.allocator import HeapTrimmer
from loraplex.adapters.residency import HostAdmission, admit_all
from loraplex.config import EngineConfig
from loraplex.engine.admin import AdminOp, ListAdapters
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.client import ReplicaView
from loraplex.engine.facts import EngineFacts
from loraplex.engine.prepare import PreparedRequest, PreparePool, Stage
from loraplex.engine.outputs import EngineSnapshot, EngineStats, RequestOutput
from loraplex.engine.request import Share
from loraplex.errors import EngineUnavailableError
from loraplex.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestStream:
    """One request's outputs, in order. Iterate it; `abort()` (synchronous, idempotent) cancels the request.

    Cleanup never needs an await, so a cancelled HTTP handler can always free the request's KV blocks."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.finished = False
        self.adapter: AdapterKey | None = None  # the adapter version the request was admitted on (None: base)
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone: nobody is listening
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._close()
            raise item
        if item.error is not None:  # e.g. its adapter failed to load
            self._close()
            raise item.error
        if item.finished:
            self._close()
        return item

    def abort(self) -> None:
        if not self.finished:
            self._close()
            self._engine._submit(lambda: self._engine.engine.abort_request(self.request_id))

    def _close(self) -> None:
        self.finished = True
        self._engine._streams.pop(self.request_id, None)


class EngineDeadError(EngineUnavailableError):
    """The engine thread has stopped."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 host_admission: HostAdmission = admit_all) -> None:
        self.engine = engine or LLMEngine(config or EngineConfig(), host_admission)
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stopped = False
        # Client-controlled CPU work (tokenizing, bad_words, grammars) runs here, never on the engine thread.
        self._preparer = PreparePool(self.engine.config.max_prepare_seconds, name="loraplex-prepare")
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    # ---- public API (event loop side) -------------------------------------------------------------
    async def add(self, prompt: list[int], sampling: SamplingParams | None = None, adapter: AdapterTarget = None,
                  request_id: str | None = None, cache_salt: str | None = None, share: Share | None = None
                  ) -> RequestStream:
        """Queue a request and return its stream; a validation error (unknown adapter, prompt too long) raises here.
        `prompt`: token ids (the server tokenized it; add never does). `stream.adapter` is the version it was
        admitted on: pass it as `adapter` to give a sibling the same version."""
        if not isinstance(prompt, list):
            raise TypeError(f"AsyncLLMEngine.add takes the prompt as token ids (a list), not {type(prompt).__name__}")
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream

        def admit(prepared: PreparedRequest) -> AdapterKey | None:
            self.engine.admit(prepared, request_id, share)
            return self.engine.requests[request_id].adapter

        admission: concurrent.futures.Future[AdapterKey | None] | None = None
        try:
            prepared = await self._prepare(prompt, sampling, adapter, cache_salt)
            admission = self._submit(lambda: admit(prepared))
            stream.adapter = await asyncio.wrap_future(admission)
        except BaseException:
            stream._close()
            if admission is not None:  # cancelled while the engine thread admitted it: free it once admitted
                admission.add_done_callback(self._abort_if_admitted(request_id))
            raise
        return stream

    def _abort_if_admitted(self, request_id: str) -> Callable[[concurrent.futures.Future[Any]], None]:
        def abort(admission: concurrent.futures.Future[Any]) -> None:
            if not admission.cancelled() and admission.exception() is None:
                self._submit(lambda: self.engine.abort_request(request_id))
        return abort

    async def _prepare(self, prompt: list[int], sampling: SamplingParams | None, adapter: AdapterTarget,
                       cache_salt: str | None) -> PreparedRequest:
        """Preparer.prepare on a prepare worker under --max-prepare-seconds when it would tokenize bad_words or
        compile a grammar; without either it is a bounded id check, done here."""
        preparer = self.engine.preparer
        if not preparer.needs_work(sampling):
            return preparer.prepare(prompt, sampling, adapter, cache_salt)
        stage = Stage("preparing the request")
        warm = self.engine.structured.warm if sampling is not None and sampling.structured else None
        return await self._preparer.run(stage, preparer.prepare, prompt, sampling, adapter, cache_salt,
                                        stage, warm=warm)

    async def generate(self, prompt: list[int], sampling: SamplingParams | None = None,
                       adapter: str | AdapterTarget = None, request_id: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs as tokens are produced. Leaving the loop early (client gone) aborts the request.
        `adapter`: "name" or "name@version" (parsed here, once), a spec or key, or None for the base model."""
        stream = await self.add(prompt, sampling, parse_target(adapter), request_id, cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    # ---- adapters --------------------------------------------------------------------------------
    async def admin(self, op: AdminOp[T]) -> T:
        """Apply an administration operation (engine/admin.py) where its `runs_on` says. One that reads the disk (a
        registration's load and validation, the adapter root's scan) runs on a worker thread, so decoding goes on
        meanwhile; a change on the engine thread between steps; a read of state at once, under the manager's lock."""
        if op.runs_on == "worker":
            return await asyncio.to_thread(self.engine.admin, op)
        if op.runs_on == "caller":
            return self.engine.admin(op)
        return await self.call(lambda: self.engine.admin(op))

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prompt block; returns how many were cached."""
        return await self.call(self.engine.reset_prefix_cache)

    async def snapshot(self) -> EngineSnapshot:
        """Queue, batch, KV and adapter-cache state, read on the engine thread between steps."""
        return await self.call(self.engine.snapshot)

    async def stats(self) -> list[EngineStats]:
        """The snapshot plus adapter tiers, the last steps' batches and requests per model (for the dashboard), of
        this engine as the one behind the server."""
        return [await self.call(self.engine.stats)]

    async def replicas(self) -> list[ReplicaView]:
        """This engine as the one replica behind the server."""
        snap = await self.snapshot()
        versions = {a.name: a.current for a in await self.admin(ListAdapters())}
        adapters = self.engine.adapters
        return [ReplicaView("local", snap.running, snap.waiting, adapters.resident(), versions,
                            adapters.registry.version)]

    # ---- the model's facts (fixed at start; safe to read from any thread) ------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def facts(self) -> EngineFacts:
        return self.engine.facts

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps; its result or exception comes back here."""
        return await asyncio.wrap_future(self._submit(fn))

    def shutdown(self) -> None:
        self._preparer.shutdown()
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def num_unfinished(self) -> int:
        return len(self.engine.requests)

    # ---- engine thread ---------------------------------------------------------------------------
    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._stopped:
            fut.set_exception(EngineDeadError("the engine is shut down"))
            return fut
        self._calls.put((fn, fut))
        self._wake.set()
        return fut

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():  # its caller is gone (e.g. an admission cancelled)
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to the caller, never kills the loop
                fut.set_exception(e)

    def _loop(self) -> None:
        trimmer = HeapTrimmer()  # freed heap pages back to the system now and then (allocator.py says why)
        while not self._stopped:
            self._run_calls()
            trimmer.maybe_trim()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug in a step: fail the requests in flight, keep serving new ones
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all(e)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
        self._fail_all(EngineDeadError("the engine is shut down"))

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put(error)
