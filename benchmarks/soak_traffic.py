"""The soak's clients: good requests (chat and completions, streaming and not, Zipf over the adapters, some
hung up on mid-stream) and bad ones (every kind docs/reliability.md lists, poisoned adapters
included), each ending in one Record."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

CHAT_PROMPTS = ["Name a colour.", "What is 2 + 2?"]
COMPLETION_PROMPTS = ["The capital of France is", "Once upon a time,"]
MAX_TOKENS = 12
TIMEOUT = 120.0  # a request not ended by then is a hang


@dataclass(slots=True)
class Record:
    kind: str  # "good", "burst" or the bad kind ("unknown-adapter", ...)
    adapter: str | None  # the model asked for (None: the base model)
    endpoint: str  # "chat" or "completions"
    prompt: int  # index into CHAT_PROMPTS / COMPLETION_PROMPTS
    stream: bool
    start: float
    phase: str  # "calm" or "chaos"
    end: float = 0.0
    status: int | None = None  # HTTP status; None: no response (transport error or hang)
    outcome: str = ""  # completed | client-aborted | 4xx | 429 | 503 | 5xx | stream-error | hang | transport-error
    text: str = ""
    served: str | None = None  # system_fingerprint: the adapter version that answered ("a3@2") or the base name
    first: float | None = None  # first content chunk (streaming)
    tokens: int = 0
    error: str = ""
    expected: tuple[int, ...] = ()  # bad requests: the statuses that are right for them


@dataclass(slots=True)
class Keys:
    admin: str
    tenant: str  # may use only `tenant_adapter`
    tenant_adapter: str
    flood: str  # the bursts' own key: a tenant flooding the server, which earns its own 429s


@dataclass(slots=True)
class BadInputs:
    """What the bad requests send: adapter directories that must never serve, and the overflowing adapter."""

    corrupt_dir: str  # weights that are not safetensors: a 400 at load
    huge_scale_dir: str  # finite weights, lora_alpha 1e300 (a scale no float holds): a 400 at load
    overflow_model: str  # a loaded adapter whose finite weights overflow in B @ A x: each request a 4xx error
    overflow_expected: tuple[int, ...] = (400, 422)  # (404,) if the server refused that adapter at load instead


MAX_BODY = 1 << 20  # the soak server's --max-body-size (benchmarks/soak.py)
Body = dict[str, Any] | str | bytes | AsyncIterator[bytes]  # JSON, raw text, raw bytes, or a chunked upload


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def good_body(rec: Record, base_name: str) -> tuple[str, dict[str, Any]]:
    model = rec.adapter or base_name
    common: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": rec.stream}
    if rec.endpoint == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": CHAT_PROMPTS[rec.prompt]}]}
    return "/v1/completions", {**common, "prompt": COMPLETION_PROMPTS[rec.prompt]}


async def send(client: httpx.AsyncClient, url: str, rec: Record, path: str, body: Body,
               key: str | None, hang_up: bool = False) -> Record:
    """Send one request and fill `rec` with how it ended. `hang_up`: close the stream after its first content."""
    headers = _headers(key)
    if not isinstance(body, dict):
        headers["Content-Type"] = "application/json"
    try:
        async with asyncio.timeout(TIMEOUT):
            async with client.stream("POST", url + path, headers=headers,
                                     **({"json": body} if isinstance(body, dict) else {"content": body})) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    rec.error = (await r.aread()).decode(errors="replace")[:300]
                elif rec.stream:
                    await _read_stream(r, rec, hang_up)
                elif path.startswith("/v1/load_lora_adapter"):
                    rec.error = (await r.aread()).decode(errors="replace")[:300]  # a load that should have failed
                else:
                    data = json.loads(await r.aread())
                    choice = data["choices"][0]
                    rec.text = choice["message"]["content"] if "message" in choice else choice["text"]
                    rec.served = data.get("system_fingerprint")
                    rec.tokens = data["usage"]["completion_tokens"]
    except TimeoutError:
        rec.outcome = "hang"
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
        rec.outcome = rec.outcome or "transport-error"
    rec.end = time.perf_counter()
    if not rec.outcome:
        rec.outcome = _outcome(rec)
    return rec


async def _read_stream(r: httpx.Response, rec: Record, hang_up: bool) -> None:
    async for line in r.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:  # an error after the 200 header arrives in-band
            rec.error = json.dumps(chunk["error"])[:300]
            rec.status = int(chunk["error"].get("code") or 500)
            rec.outcome = "4xx" if 400 <= rec.status < 500 else "stream-error"  # a client's error, in-band
            return
        rec.served = chunk.get("system_fingerprint", rec.served)
        for c in chunk.get("choices", []):
            piece = c.get("delta", {}).get("content") if "delta" in c else c.get("text")
            if piece:
                rec.first = rec.first or time.perf_counter()
                rec.text += piece
                rec.tokens += 1
                if hang_up:
                    rec.outcome = "client-aborted"
                    return  # leaving the context manager closes the connection mid-stream


def _outcome(rec: Record) -> str:
    if rec.status == 200:
        return "completed"
    if rec.status in (429, 503):
        return str(rec.status)
    if rec.status is not None and 400 <= rec.status < 500:
        return "4xx"
    return "5xx"


# ---- bad requests: (kind, expected statuses, how to send it) ------------------------------------------------

def bad_request(kind: str, base_name: str, keys: Keys, bad: BadInputs) -> tuple[str, Body, str | None, tuple[int, ...]]:
    """(path, body, key, expected statuses) of one bad request of `kind`."""
    chat = {"model": base_name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    corrupt_dir = bad.corrupt_dir
    if kind == "unknown-adapter":
        return "/v1/chat/completions", {**chat, "model": f"nobody-{random.randrange(10**9)}"}, keys.admin, (404,)
    if kind == "bad-params":
        body = random.choice([{**chat, "temperature": -1}, {**chat, "top_p": 7}, {**chat, "max_tokens": -3},
                              {**chat, "n": 10_000}, {**chat, "logit_bias": {"x": 1}}, {**chat, "max_tokens": 10**9}])
        return "/v1/chat/completions", body, keys.admin, (400,)
    if kind == "long-prompt":
        return "/v1/completions", {"model": base_name, "prompt": "word " * 4000, "max_tokens": 4}, keys.admin, (400,)
    if kind == "malformed-json":
        return "/v1/chat/completions", '{"model": "' + base_name + '", "messages": [', keys.admin, (400,)
    if kind == "wrong-key":
        return "/v1/chat/completions", chat, random.choice([None, "sk-wrong"]), (401,)
    if kind == "forbidden-adapter":
        return "/v1/chat/completions", {**chat, "model": "a1" if keys.tenant_adapter != "a1" else "a2"}, keys.tenant, (403,)
    if kind == "corrupt-adapter":
        return "/v1/load_lora_adapter", {"lora_name": f"broken{random.randrange(4)}", "lora_path": corrupt_dir}, \
            keys.admin, (400,)
    if kind == "traversal-name":
        if random.random() < 0.5:
            return "/v1/chat/completions", {**chat, "model": random.choice(["../etc", "a/../../x", "..", "/abs"])}, \
                keys.admin, (400, 404)
        return "/v1/load_lora_adapter", {"lora_name": "../escape", "lora_path": corrupt_dir}, keys.admin, (400,)
    if kind == "huge-scale-adapter":  # alpha / r overflows the scale: refused at load, never in a slot
        return "/v1/load_lora_adapter", {"lora_name": f"poison-scale{random.randrange(4)}",
                                         "lora_path": bad.huge_scale_dir}, keys.admin, (400,)
    if kind == "overflow-adapter":  # runs beside the good requests: it must end in its own error, theirs unchanged
        body = {**chat, "model": bad.overflow_model, "max_tokens": MAX_TOKENS, "stream": random.random() < 0.5}
        return "/v1/chat/completions", body, keys.admin, bad.overflow_expected
    if kind == "oversized-body":  # over the server's --max-body-size: declared (Content-Length) or chunked
        filler = "x" * (MAX_BODY + (32 << 10))
        text = json.dumps({**chat, "messages": [{"role": "user", "content": filler}]})
        return "/v1/chat/completions", (text if random.random() < 0.5 else _chunked(text.encode())), keys.admin, (413,)
    raise ValueError(kind)


async def _chunked(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    """`data` as a chunked upload: no Content-Length, so the server must count while it reads."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


BAD_KINDS = ["unknown-adapter", "bad-params", "long-prompt", "malformed-json", "wrong-key", "forbidden-adapter",
             "corrupt-adapter", "traversal-name", "huge-scale-adapter", "overflow-adapter", "oversized-body"]


@dataclass
class Traffic:
    """N clients in a loop until `stop_at`; every request they send is appended to `records`."""

    url: str
    base_name: str
    adapters: list[str]
    weights: list[float]  # Zipf popularity of `adapters`
    keys: Keys
    bad: BadInputs
    seed: int
    phase: str = "calm"
    chaos: bool = False  # bad requests and hang-ups are part of the chaos phase
    kinds: frozenset[str] = frozenset({"bad", "hangups"})  # which of them (to isolate one fault's effect)
    records: list[Record] = field(default_factory=list)
    bursts: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each burst

    async def client(self, client: httpx.AsyncClient, i: int, stop_at: float) -> None:
        rng = random.Random(self.seed * 1000 + i)
        while time.perf_counter() < stop_at:
            if self.chaos and "bad" in self.kinds and rng.random() < 0.10:
                await self.bad_one(client, rng.choice(BAD_KINDS))
                continue
            adapter = None if rng.random() < 0.1 else rng.choices(self.adapters, self.weights)[0]
            rec = Record("good", adapter, rng.choice(["chat", "completions"]), rng.randrange(2),
                         rng.random() < 0.5, time.perf_counter(), self.phase)
            hang_up = self.chaos and "hangups" in self.kinds and rec.stream and rng.random() < 0.2  # 10% of all
            self.records.append(rec)
            path, body = good_body(rec, self.base_name)
            await send(client, self.url, rec, path, body, self.keys.admin, hang_up)

    async def bad_one(self, client: httpx.AsyncClient, kind: str) -> Record:
        path, body, key, expected = bad_request(kind, self.base_name, self.keys, self.bad)
        stream = isinstance(body, dict) and bool(body.get("stream"))
        rec = Record(kind, None, "chat", 0, stream, time.perf_counter(), self.phase, expected=expected)
        self.records.append(rec)
        return await send(client, self.url, rec, path, body, key)

    async def every_bad_kind(self, client: httpx.AsyncClient) -> None:
        """One bad request of each kind at once, as the chaos phase starts: even a short run sends every kind."""
        await asyncio.gather(*(self.bad_one(client, kind) for kind in BAD_KINDS))

    async def burst(self, client: httpx.AsyncClient, size: int) -> None:
        """`size` short requests at once from the flooding key, more than its cap (and the server's queue) admits: the
        excess must get 429s at once, and no other key a 429."""
        async def one(j: int) -> None:
            rec = Record("burst", None, "completions", j % 2, False, time.perf_counter(), self.phase)
            self.records.append(rec)
            path, body = good_body(rec, self.base_name)
            await send(client, self.url, rec, path, body, self.keys.flood)
        start = time.perf_counter()
        await asyncio.gather(*(one(j) for j in range(size)))
        self.bursts.append((start, time.perf_counter()))

    def during_burst(self, rec: Record) -> bool:
        """While a burst fills the server, any request may find it at capacity."""
        return any(a <= rec.end and rec.start <= b for a, b in self.bursts)
