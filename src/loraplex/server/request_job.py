"""RequestJob: one generation request's life in the server, the same for chat, completions and /generate:
admit its places in the bounded queue -> open one engine stream per prompt and choice, each on the adapter version
the first was admitted on -> collect them (noticing a client that hangs up) or stream them merged -> record each
prompt's outcome -> leave the places, exactly once. The routes only shape the responses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from loraplex.engine.client import AdapterTarget, EngineClient, EngineStream
from loraplex.engine.outputs import RequestOutput
from loraplex.engine.request import Share
from loraplex.sampling import SamplingParams
from loraplex.server import auth
from loraplex.server.auth import KeyScope
from loraplex.server.errors import APIError, error_body, public_message, status_of
from loraplex.server.quotas import QuotaExceeded
from loraplex.server.state import ServerState
from loraplex.server.stats.tracker import Tracker

Started = list[tuple[RequestOutput, EngineStream]]


def pinned_version(stream: EngineStream, adapter: AdapterTarget) -> AdapterTarget:
    """What admits a sibling of `stream` (another choice or prompt of one HTTP request) on its version: the key
    it was admitted on."""
    return adapter if stream.adapter is None else stream.adapter


def fingerprint(firsts: Started, base_name: str) -> str:
    """OpenAI's system_fingerprint, naming the backend the answer came from: the adapter version ("legal@2"), or
    the base model's served name."""
    key = firsts[0][1].adapter if firsts else None
    return base_name if key is None else str(key)


async def open_streams(engine: EngineClient, prompt: list[int], params: list[SamplingParams], adapter: AdapterTarget,
                       tracker: Tracker, cache_salt: str | None = None, share: Share | None = None) -> Started:
    """Start one engine request per choice and wait for each one's first output, so that an invalid request
    (unknown adapter, prompt too long, adapter that fails to load) surfaces as an error status before any
    streaming begins. Every choice runs on the adapter version the first was admitted on, even if a promotion
    lands between their admissions."""
    streams: list[EngineStream] = []
    firsts: Started = []
    try:
        for p in params:
            streams.append(await engine.add(prompt, p, adapter, cache_salt=cache_salt, share=share))
            adapter = pinned_version(streams[0], adapter)
            tracker.admitted()  # the model resolved: a registered adapter, or the base model
        for s in streams:
            first = await anext(s)
            tracker.saw(first)
            firsts.append((first, s))
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return firsts


async def merged(firsts: Started, tracker: Tracker) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the choices' outputs as they come: (choice index, output). Leaving early aborts them all."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException] | None] = asyncio.Queue()

    async def pump(i: int, first: RequestOutput, stream: EngineStream) -> None:
        try:
            await queue.put((i, first))
            async for out in stream:
                tracker.saw(out)
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(firsts)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            i, value = item
            if isinstance(value, BaseException):
                raise value
            yield i, value
    finally:
        for t in tasks:
            t.cancel()
        for _, s in firsts:
            s.abort()  # synchronous: works even while this task is being cancelled


async def collect(request: Request, firsts: Started, tracker: Tracker) -> list[RequestOutput]:
    """Run every choice to the end; abort them all if the client disconnects first."""
    finals: list[RequestOutput | None] = [None] * len(firsts)

    async def run() -> None:
        async for i, out in merged(firsts, tracker):
            if out.finished:
                finals[i] = out

    task = asyncio.create_task(run())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if not done and await request.is_disconnected():
                raise APIError(499, "client disconnected", "client_closed_request")
        task.result()
    finally:
        if not task.done():
            task.cancel()
        for _, s in firsts:
            s.abort()  # no-op for finished requests; frees the rest at once
    return [f for f in finals if f is not None]


def refused(tracker: Tracker, e: BaseException) -> None:
    """Record a prompt that ended with `e` before it finished."""
    status = _outcome(e)
    if status == "404":
        tracker.model = "unknown"  # a client's arbitrary model name never becomes a metric label or a row
    tracker.done(status)


def _outcome(e: BaseException) -> str:
    """The status a request that ended with `e` is recorded with (499: cancelled, the client went away)."""
    return str(status_of(e)[0]) if isinstance(e, Exception) else "499"


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass(slots=True)
class RequestJob:
    st: ServerState
    request: Request
    scope: KeyScope  # the caller's, checked once by the route
    adapter: AdapterTarget  # as resolved from the body's `model`, once
    cache_salt: str | None = None
    priority: int = 0  # vLLM's, within the caller's tenant (engine/fair_share.py)
    started: list[tuple[Tracker, Started]] = field(default_factory=list)  # per prompt: its tracker, its choices
    places: int = 0
    # While streaming (`outputs`): each choice's tokens so far, keyed (prompt, choice), and the finished outputs.
    generated: dict[tuple[int, int], int] = field(default_factory=dict)
    finals: list[RequestOutput] = field(default_factory=list)
    _recorded: int = 0  # prompts whose outcome is recorded (in order)

    @property
    def tenant(self) -> str:
        """Whose caps and books the request counts against: the key's id, else the adapter's name (the base model
        one tenant, by its served name; keys and keyless tenants never meet on one server)."""
        return self.scope.owner or self._model

    @property
    def share(self) -> Share:
        """The engine's tenant, weight and priority: the key's; without keys, this request's `tenant` (the adapter's
        name, or the served name for the base model) and its weight, so that the engine schedules by the same
        tenants as the caps count."""
        if self.scope.owner is not None:
            return self.scope.share(self.priority)
        return Share(self._model, self.st.tenant_weights.get(self._model, 1.0), self.priority)

    @property
    def _model(self) -> str:
        return self.st.served_name if self.adapter is None else self.adapter.name

    def enter(self, places: int, tokens: int) -> None:
        """Take `places`: the tenant's caps first (a 429 naming the one it is over), then the server's bounded
        queue (503); the tenant's x-ratelimit headers go on the answer (server/app.py)."""
        try:
            headers = self.st.quotas.admit(self.tenant, self.scope.limits, places, tokens)
        except QuotaExceeded as e:
            # A key is a tenant at once; a keyless name only once the engine has taken one of its requests.
            self.st.metrics.shares.throttled(self.tenant, self.share.weight, e.limit,
                                             known=self.scope.owner is not None)
            raise
        try:
            self.st.admit(places)
        except BaseException:
            self.st.quotas.release(self.tenant, places)
            raise
        self.places = places
        self.request.state.ratelimit = headers

    def leave(self) -> None:
        self.st.leave(self.places)
        self.st.quotas.release(self.tenant, self.places)

    async def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Admit len(prompts) * len(params) places (429 over the tenant's caps, 503 when the server is full), then
        open every stream; a refusal on any (unknown adapter, prompt too long, load failure) aborts those opened,
        leaves the places and raises. Tokens are counted as OpenAI counts them: each choice's prompt and
        max_tokens."""
        self.enter(len(prompts) * len(params),
                   sum(len(p) for p in prompts) * len(params) + sum(p.max_tokens for p in params) * len(prompts))
        try:
            adapter = self.adapter
            salt = auth.cache_salt(self.scope, self.cache_salt)  # each key its own prefix-cache namespace
            for prompt in prompts:
                self.started.append(await self._open(prompt, params, adapter, salt))
                adapter = pinned_version(self.started[0][1][0][1], adapter)  # every prompt on the first's version
        except BaseException as e:
            self._record(_outcome(e))  # the prompts already started end with the request's refusal
            self._abort()
            self.leave()
            raise

    def tracker(self, prompt: list[int]) -> Tracker:
        """One prompt's timing and outcome, in its model's series (per name, not version), the caller's rows and its
        tenant's books."""
        return Tracker(self.st.metrics, self._model, prompt_tokens=len(prompt), owner=self.scope.owner,
                       tenant=self.tenant, weight=self.share.weight)

    async def _open(self, prompt: list[int], params: list[SamplingParams], adapter: AdapterTarget, salt: str | None
                    ) -> tuple[Tracker, Started]:
        tracker = self.tracker(prompt)
        try:
            return tracker, await open_streams(self.st.engine, prompt, params, adapter, tracker, salt, self.share)
        except Exception as e:
            refused(tracker, e)
            raise

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.started[0][1], self.st.served_name)

    async def collect(self) -> list[list[RequestOutput]]:
        """Every prompt's choices run to the end, in order; then the places are left."""
        try:
            outs = []
            for tracker, firsts in self.started:
                outs.append(await collect(self.request, firsts, tracker))
                tracker.done("200")
                self._recorded += 1
            return outs
        except BaseException as e:
            self._record(_outcome(e))
            raise
        finally:
            self._abort()  # after an error or a hang-up, the other prompts' requests stop too
            self.leave()

    async def outputs(self) -> AsyncIterator[tuple[int, int, RequestOutput]]:
        """(prompt index, choice index, output) as they come, prompt after prompt (for `stream`); `generated` and
        `finals` are up to date at each."""
        for p, (tracker, firsts) in enumerate(self.started):
            async for i, out in merged(firsts, tracker):
                self.generated[(p, i)] = len(out.outputs[0].token_ids)
                if out.finished:
                    self.finals.append(out)
                yield p, i, out
            tracker.done("200")
            self._recorded += 1

    async def stream(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        """`chunks` (the route's, built from `outputs()`) as server-sent events, then [DONE]. An error after
        streaming began is reported in-band, as vLLM does, and is the outcome of the prompts not yet recorded;
        a client that went away, 499. The places are left at the end."""
        try:
            async for chunk in chunks:
                yield sse(chunk)
            yield sse("[DONE]")
        except Exception as e:
            code, err = status_of(e)
            yield sse(error_body(code, public_message(e), err))
            yield sse("[DONE]")
            self._record(str(code))
        finally:
            self._record("499")  # the client went away (nothing left when it did not)
            self._abort()
            self.leave()

    def _record(self, status: str) -> None:
        for tracker, _ in self.started[self._recorded:]:
            tracker.done(status)
        self._recorded = len(self.started)

    def _abort(self) -> None:
        for _, firsts in self.started:
            for _, stream in firsts:
                stream.abort()  # a no-op for a finished request
