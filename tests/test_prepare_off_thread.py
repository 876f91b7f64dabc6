"""Client-controlled CPU work runs on prepare workers, never on the engine thread or the event loop: while a
schema compiles, /health answers and a running stream keeps receiving tokens; a compile past
--max-prepare-seconds is a 400 naming the limit, and what it produces late is dropped; the chat template, the
tokenizer and the grammar compiler are never called on the engine thread or the event loop (a spy records the
thread of every call); a schema is compiled once. Assertions are on ordering and counts, never on timings: the
"slow" compile is a patched one that waits for the test to release it."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.engine.prepare import PreparePool, PrepareTimeoutError, Stage
from loraplex.server.app import build_app
from server_util import running

CAP = 1.0  # the module server's --max-prepare-seconds; the gated compile below outlasts it
SLOW = {"type": "object", "properties": {"slow_marker": {"type": "string", "maxLength": 5}},
        "required": ["slow_marker"]}


def where() -> str:
    """Where a call runs: "event loop" when a coroutine made it synchronously, else the thread's name."""
    try:
        asyncio.get_running_loop()
        return "event loop"
    except RuntimeError:
        return threading.current_thread().name


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncLLMEngine]:
    eng = AsyncLLMEngine(EngineConfig(dtype="float32", max_model_len=256, kv_cache_memory=32 << 20,
                                      max_prepare_seconds=CAP))
    yield eng


@pytest.fixture(scope="module")
def server(engine: AsyncLLMEngine) -> Iterator[str]:
    with running(build_app(engine)) as url:
        yield url


@pytest.fixture
def gate(engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Compiling a schema that mentions slow_marker waits until the test sets `release` (a compile that takes as
    long as the test wants); every compile records where it ran."""
    structured = engine.engine.structured
    original = structured._compile
    state: dict[str, Any] = {"entered": threading.Event(), "release": threading.Event(), "done": threading.Event(),
                             "places": []}

    def compile_(spec: Any) -> Any:
        state["places"].append(where())
        if "slow_marker" in spec.value:
            state["entered"].set()
            state["release"].wait(60)
            try:
                return original(spec)
            finally:
                state["done"].set()
        return original(spec)

    monkeypatch.setattr(structured, "_compile", compile_)
    yield state
    state["release"].set()


def _stream(url: str, model: str, out: queue.Queue[str | None]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": 48,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                out.put(line)
    out.put(None)


def _post_in_thread(url: str, path: str, body: dict[str, Any]) -> Callable[[], httpx.Response]:
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(url + path, json=body, timeout=120)))
    t.start()

    def join() -> httpx.Response:
        t.join(120)
        return result["r"]

    return join


def test_health_and_streams_go_on_while_a_schema_compiles_and_the_cap_is_a_400(
        server: str, engine: AsyncLLMEngine, gate: dict[str, Any]) -> None:
    chunks: queue.Queue[str | None] = queue.Queue()
    streamer = threading.Thread(target=_stream, args=(server, engine.facts.model_name, chunks), daemon=True)
    streamer.start()
    assert chunks.get(timeout=120) is not None  # the stream is running
    late_before = engine._preparer.late
    slow = _post_in_thread(server, "/v1/chat/completions", {
        "model": engine.facts.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SLOW}}})
    assert gate["entered"].wait(120), "the slow schema never started compiling"
    # The compile is held open: everything below happens while it runs.
    assert httpx.get(server + "/health", timeout=30).status_code == 200
    for _ in range(3):
        assert chunks.get(timeout=120) is not None, "the stream ended instead of making progress"
    assert not gate["done"].is_set(), "the health check and the tokens came only once the compile had ended"
    r = slow()  # the cap passes while the compile is still held
    assert not gate["done"].is_set()
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "compiling the structured output's json_schema" in message and "--max-prepare-seconds 1" in message
    gate["release"].set()
    assert gate["done"].wait(120)
    streamer.join(120)
    assert engine._preparer.late == late_before + 1  # the late compile's result was dropped, not admitted
    assert all(p.startswith("loraplex-prepare") for p in gate["places"]), gate["places"]


def test_engine_thread_and_event_loop_never_template_tokenize_or_compile(
        server: str, engine: AsyncLLMEngine, gate: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    tok = engine.tokenizer
    places: dict[str, list[str]] = {"encode": [], "apply_chat_template": [], "decode": []}
    for name in places:
        original = getattr(tok, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            places[_name].append(where())
            return _original(*args, **kwargs)

        monkeypatch.setattr(tok, name, spy)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}, "required": ["answer"]}
    chat = {"model": engine.facts.model_name, "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 6,
            "temperature": 0,
            "bad_words": ["no", "never"], "logprobs": True, "top_logprobs": 2}
    for body in ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
                 {**chat, "stream": True}):
        r = httpx.post(server + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
    r = httpx.post(server + "/v1/completions", json={"model": engine.facts.model_name, "prompt": "One, two,", "max_tokens": 4,
                                                     "echo": True, "logprobs": 1, "bad_words": ["three"]}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["tokens"], r.text
    assert httpx.post(server + "/tokenize", json={"prompt": "hello"}, timeout=60).status_code == 200
    assert httpx.post(server + "/detokenize", json={"tokens": [1, 2, 3]}, timeout=60).status_code == 200
    assert places["encode"] and places["apply_chat_template"] and gate["places"]
    for name, seen in [*places.items(), ("grammar compile", gate["places"])]:
        assert "event loop" not in seen, (name, seen)
        if name != "decode":  # the engine thread decodes what it generates (the detokenizer); nothing else
            assert "loraplex-engine" not in seen, (name, seen)


class _Counting:
    """llguidance.LLMatcher, counting the matchers constructed (each construction compiles the grammar)."""

    def __init__(self, real: Any) -> None:
        self.real, self.made = real, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.made += 1
        return self.real(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_schema_is_compiled_once(server: str, engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    import llguidance

    engine.engine.structured.warm()  # the one-time set-up builds a matcher of its own: not counted
    counting = _Counting(llguidance.LLMatcher)
    monkeypatch.setattr(llguidance, "LLMatcher", counting)
    schema = {"type": "object", "properties": {"once": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["once"], "additionalProperties": False}
    body = {"model": engine.facts.model_name, "messages": [{"role": "user", "content": "A digit?"}], "max_tokens": 12,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}}
    outputs = []
    for _ in range(3):
        r = httpx.post(server + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        outputs.append(json.loads(r.json()["choices"][0]["message"]["content"]))
    assert counting.made == 1  # the later requests copied the compiled matcher
    assert all(0 <= o["once"] <= 9 for o in outputs)  # each copy starts at the grammar's start


# ---- the pool itself (no model) ---------------------------------------------------------------------


def test_cap_counts_from_the_start_of_a_job_not_its_wait_and_a_late_result_is_dropped() -> None:
    async def main() -> None:
        pool = PreparePool(max_seconds=0.2, workers=1, name="test-prepare")
        release = threading.Event()
        stage = Stage("tokenizing the prompt")
        hog = asyncio.ensure_future(pool.run(stage, lambda: release.wait(30) and "hog"))
        queued = asyncio.ensure_future(pool.run(Stage("tokenizing bad_words"), lambda: "queued"))
        with pytest.raises(PrepareTimeoutError, match=r"tokenizing the prompt took more than 0.2 s "
                                                      r"\(--max-prepare-seconds 0.2\)"):
            await hog
        assert pool.late == 1 and not queued.done()  # the queued job has waited a full cap, uncharged
        release.set()
        assert await queued == "queued"
        pool.shutdown()

    asyncio.run(main())


def test_a_job_whose_caller_left_before_it_started_never_runs() -> None:
    async def main() -> None:
        pool = PreparePool(max_seconds=30, workers=1, name="test-prepare")
        release = threading.Event()
        ran: list[str] = []
        first = asyncio.ensure_future(pool.run(Stage("a"), lambda: release.wait(30)))
        gone = asyncio.ensure_future(pool.run(Stage("b"), lambda: ran.append("gone")))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone  # the caller has left while its job still waited behind `first`
        release.set()
        assert await first is True
        assert await pool.run(Stage("c"), lambda: "after") == "after"
        assert ran == []
        pool.shutdown()

    asyncio.run(main())
