"""Per-tenant caps at the door (issue 29, item 3): the books on a fake clock, exactly at the caps; then through the
openai client and httpx, a 429 in OpenAI's shape with its headers, the x-ratelimit headers on every answer (streamed
too), an in-flight cap, and one tenant's default cap filling before the server's queue so the others are served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import ATTN
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.auth import key_id, load_keys
from loraplex.server.errors import APIError
from loraplex.server.quotas import Limits, Quotas, duration
from loraplex.server.state import ServerState
from server_util import running

BASE = "SmolLM2-135M-Instruct"
STATES: dict[str, ServerState] = {}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(q: Quotas, tenant: str, limits: Limits, places: int = 1, tokens: int = 0) -> APIError:
    with pytest.raises(APIError) as e:
        q.admit(tenant, limits, places, tokens)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    return e.value


def test_requests_per_minute_exactly_at_the_cap_and_refilled() -> None:
    clock, limits = Clock(), Limits(requests_per_minute=3)
    q = Quotas(default_in_flight=100, clock=clock)
    heads = [q.admit("k", limits, 1, 0) for _ in range(3)]
    assert [h["x-ratelimit-remaining-requests"] for h in heads] == ["2", "1", "0"]
    assert heads[0]["x-ratelimit-limit-requests"] == "3" and heads[2]["x-ratelimit-reset-requests"] == "1m0s"
    e = refused(q, "k", limits)
    assert e.type == "requests" and e.headers["Retry-After"] == "20" and "limit 3" in e.message
    clock.now += 19.9
    refused(q, "k", limits)
    clock.now += 0.1  # 20 s: one request's worth refilled
    assert q.admit("k", limits, 1, 0)["x-ratelimit-remaining-requests"] == "0"
    assert q.admit("other", limits, 1, 0)["x-ratelimit-remaining-requests"] == "2"  # each tenant its own books


def test_tokens_per_minute_exactly_at_the_cap() -> None:
    clock, limits = Clock(), Limits(tokens_per_minute=100)
    q = Quotas(default_in_flight=100, clock=clock)
    q.admit("k", limits, 1, 60)
    assert q.admit("k", limits, 1, 40)["x-ratelimit-remaining-tokens"] == "0"
    e = refused(q, "k", limits, tokens=1)
    assert e.type == "tokens" and e.headers["Retry-After"] == "1"
    clock.now += 30
    assert q.admit("k", limits, 1, 50)["x-ratelimit-remaining-tokens"] == "0"
    big = Limits(tokens_per_minute=10)  # a request over the whole limit runs on a full bucket, then waits it out
    q.admit("b", big, 1, 25)
    assert refused(q, "b", big, tokens=1).headers["Retry-After"] == "96"


def test_in_flight_cap_and_the_books_emptied() -> None:
    q = Quotas(default_in_flight=4, clock=Clock())
    q.admit("k", Limits(), 3, 0)
    assert "in flight" in refused(q, "k", Limits(), places=2).message
    q.admit("k", Limits(), 1, 0)
    q.release("k", 4)
    assert q.books == {}
    q.admit("k", Limits(max_in_flight=1), 1, 0)
    refused(q, "k", Limits(max_in_flight=1))


def test_duration_is_openais_form() -> None:
    assert [duration(s) for s in (0.02, 1.0, 1.5, 60.0, 360.25)] == ["20ms", "1s", "1.5s", "1m0s", "6m0.25s"]


# ---- through the server ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(adapter_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    adapter = adapter_factory("quota_a", r=4, targets=ATTN, seed=12)
    keys = tmp_path_factory.mktemp("quota") / "keys.json"
    keys.write_text(json.dumps({"keys": {
        "sk-rpm": {"adapters": ["a"], "requests_per_minute": 2},
        "sk-tpm": {"adapters": ["a"], "tokens_per_minute": 300},
        "sk-two": {"adapters": ["a"], "max_in_flight": 2},
        "sk-flood": {"adapters": ["a"]}, "sk-calm": {"adapters": ["a"]},
        "sk-admin": {"adapters": ["*"], "admin": True}}}))
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", max_model_len=4096, max_num_seqs=2,
                                         lora_modules=(("a", str(adapter)),)))
    # The server's bounded queue: 2 running + 4 queued; one tenant's default cap: 2 + 4 // 2 = 4.
    app = build_app(engine, keys=load_keys(keys), max_queue=4)
    with running(app) as url:
        STATES[url] = app.state.loraplex
        yield url


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def ask(url: str, key: str, **kw: Any) -> Any:
    return client(url, key).chat.completions.with_raw_response.create(
        model="a", messages=[{"role": "user", "content": "Hi"}], **{"max_tokens": 2, **kw})


def test_a_429_in_openais_shape_with_its_headers(url: str) -> None:
    first = ask(url, "sk-rpm")
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert ask(url, "sk-rpm").headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as e:
        ask(url, "sk-rpm")
    assert e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
    assert int(e.value.response.headers["Retry-After"]) >= 1
    assert e.value.response.headers["x-ratelimit-limit-requests"] == "2"
    assert ask(url, "sk-calm").http_response.status_code == 200  # another key is untouched
    metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
    assert f'loraplex_tenant_throttled_total{{limit="requests",tenant="{key_id("sk-rpm")}"}} 1.0' in metrics


def test_token_headers_and_streams_carry_them(url: str) -> None:
    r = ask(url, "sk-tpm")
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    # Charged as OpenAI counts: the prompt and max_tokens (a token or so refills while it runs).
    assert r.headers["x-ratelimit-limit-tokens"] == "300" and 300 - remaining >= r.parse().usage.prompt_tokens + 2 - 1
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-tpm"}, timeout=60,
                      json={"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                            "stream": True}) as s:
        assert s.status_code == 200 and int(s.headers["x-ratelimit-remaining-tokens"]) < remaining
        s.read()
    with pytest.raises(openai.RateLimitError) as e:
        ask(url, "sk-tpm", max_tokens=220)  # its prompt and 220 tokens: over what is left of the 300
    assert e.value.type == "tokens"


def _hold(stack: ExitStack, url: str, key: str) -> int:
    """Open a long stream (4000 tokens: it runs for the whole test) and read its first chunk; the status."""
    r = stack.enter_context(httpx.stream(
        "POST", url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120, json=LONG))
    if r.status_code == 200:
        lines = r.iter_lines()
        next(lines)
        stack.callback(lines.close)  # kept until the stack closes: a dropped iterator closes the response
    return r.status_code


LONG = {"model": "a", "prompt": "Tell me a story.", "max_tokens": 4000, "ignore_eos": True, "stream": True}


def test_an_in_flight_cap(url: str) -> None:
    with ExitStack() as stack:
        assert [_hold(stack, url, "sk-two") for _ in range(3)] == [200, 200, 429]
    assert ask(url, "sk-two").http_response.status_code == 200  # the books emptied when its streams closed


def test_one_tenant_fills_its_own_cap_before_the_servers_queue(url: str) -> None:
    """The flooding key's default cap (4 of the server's 6 places; 2 run, 2 queue) is hit first: a 429, never the
    server's 503, and the calm key is served beside it at once (it takes a running place: engine/fair_share.py)."""
    books = STATES[url].quotas.books

    async def flood() -> None:
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": "Bearer sk-flood"}) as c:
            async def hold() -> None:
                async with c.stream("POST", url + "/v1/completions", json=LONG):
                    await asyncio.sleep(3600)  # until cancelled: the client hangs up, the server aborts it

            holds = [asyncio.create_task(hold()) for _ in range(4)]
            try:
                while key_id("sk-flood") not in books or books[key_id("sk-flood")].in_flight < 4:
                    await asyncio.sleep(0.05)
                over = await c.post(url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 2})
                assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded", over.text
                calm = await c.post(url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 2},
                                    headers={"Authorization": "Bearer sk-calm"})
                assert calm.status_code == 200, calm.text
            finally:
                for h in holds:
                    h.cancel()
                await asyncio.gather(*holds, return_exceptions=True)

    asyncio.run(flood())
