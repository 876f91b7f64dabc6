"""Turn an HTTP request into engine requests and back: sampling params, chat rendering, the n choices,
non-streaming collection with disconnect detection, and per-request metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from loraplex.engine.async_engine import AsyncLLMEngine, RequestStream
from loraplex.engine.outputs import RequestOutput
from loraplex.errors import InvalidRequestError
from loraplex.sampling import SamplingParams
from loraplex.server.errors import APIError
from loraplex.server.metrics import ServerMetrics
from loraplex.server.protocol import ChatMessage, SamplingFields


def sampling_params(body: SamplingFields, max_tokens: int, default_temperature: float = 1.0) -> SamplingParams:
    for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("logit_bias", {}),
                          ("logprobs", False), ("top_logprobs", 0)):
        value = getattr(body, name)
        if value not in (None, neutral) and not (name == "logprobs" and value == 0):
            raise APIError(400, f"{name} is not supported by this server", "BadRequestError", name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=default_temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_tokens=body.min_tokens,
        seed=body.seed,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    rendered = []
    for m in messages:
        content = m.content or ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"message content part of type {part.get('type')!r} is not supported; "
                                   "only text", "BadRequestError", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        rendered.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices; with a seed, choice i uses seed + i so they differ yet stay reproducible."""
    if n < 1 or n > 16:
        raise InvalidRequestError(f"n must be in [1, 16], got {n}")
    return [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]


@dataclass(slots=True)
class Tracker:
    """Per-request timing for TTFT, time per output token and latency."""

    metrics: ServerMetrics
    model: str
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0

    def saw(self, out: RequestOutput) -> None:
        new = len(out.outputs[0].delta_token_ids)
        if new and self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.labels(self.model).observe(self.first - self.start)
        self.tokens += new

    def done(self, status: str) -> None:
        end = time.perf_counter()
        m = self.metrics
        m.requests.labels(self.model, status).inc()
        m.latency.labels(self.model).observe(end - self.start)
        m.generation_tokens.labels(self.model).inc(self.tokens)
        m.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
        if self.first is not None and self.tokens > 1:
            m.tpot.labels(self.model).observe((end - self.first) / (self.tokens - 1))


Started = list[tuple[RequestOutput, RequestStream]]


async def open_streams(engine: AsyncLLMEngine, prompt: list[int], params: list[SamplingParams], adapter: str | None,
                       tracker: Tracker, cache_salt: str | None = None) -> Started:
    """Start one engine request per choice and wait for each one's first output, so that an invalid request
    (unknown adapter, prompt too long, adapter that fails to load) surfaces as an error status before any
    streaming begins."""
    streams: list[RequestStream] = []
    firsts: Started = []
    try:
        for p in params:
            streams.append(await engine.add(prompt, p, adapter, cache_salt=cache_salt))
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

    async def pump(i: int, first: RequestOutput, stream: RequestStream) -> None:
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
                raise APIError(499, "client disconnected", "ClientClosedRequest")
        task.result()
    finally:
        if not task.done():
            task.cancel()
        for _, s in firsts:
            s.abort()  # no-op for finished requests; frees the rest at once
    return [f for f in finals if f is not None]
