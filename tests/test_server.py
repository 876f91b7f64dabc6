"""The HTTP server through the official openai client: chat, completions, streaming, per-request adapters,
tenant isolation, adapter management, every error status, abort on disconnect, concurrency."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ALL, ATTN, MLP
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.auth import KeyScope
from loraplex.server.state import ServerState
from server_util import metric, running

BASE = "SmolLM2-135M-Instruct"
ADMIN, LEGAL, NOBASE = "sk-admin", "sk-legal", "sk-nobase"
TENANTS = [f"t{i}" for i in range(8)]
Q = [{"role": "user", "content": "What is the capital of France?"}]
STATES: dict[str, ServerState] = {}


@pytest.fixture(scope="module")
def server(adapter_factory: Callable[..., Path]) -> Iterator[str]:
    targets = [ATTN, MLP, ALL]
    mods = tuple((t, str(adapter_factory(f"srv{i}", r=4 + i, targets=targets[i % 3], seed=300 + i)))
                 for i, t in enumerate(TENANTS))
    # Tenants hold keys: batch-invariant, as `serve --api-keys` is by default.
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=mods, max_model_len=512, max_loras=8,
                                         batch_invariant=True))
    keys = {ADMIN: KeyScope(frozenset({"*"}), admin=True), LEGAL: KeyScope(frozenset({"t0"})),
            NOBASE: KeyScope(frozenset({"t1"}), base=False)}
    app = build_app(engine, keys=keys)
    with running(app) as url:
        STATES[url] = app.state.loraplex
        yield url


def test_models_say_whether_outputs_are_batch_invariant(server: str) -> None:
    """/v1/models says batch invariance is on and how it holds, to every key that sees the base model."""
    for key in (ADMIN, LEGAL):
        base = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]
        inv = base["batch_invariant"]
        assert inv["enabled"] is True and inv["detail"].startswith("on: every base linear runs in calls of at most")


def client(url: str, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def chat(url: str, model: str, key: str = ADMIN, **kw: object) -> str:
    r = client(url, key).chat.completions.create(model=model, messages=Q, max_tokens=12, temperature=0, **kw)
    return r.choices[0].message.content or ""


def test_chat_completions_and_usage(server: str) -> None:
    r = client(server).chat.completions.create(model=BASE, messages=Q, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completions_and_stop(server: str) -> None:
    c = client(server)
    r = c.completions.create(model=BASE, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    s = c.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert s.choices[0].finish_reason == "stop" and " 7" not in s.choices[0].text and "6" in s.choices[0].text


def test_streaming_matches_non_streaming(server: str) -> None:
    """SSE chunks concatenate to the non-streaming answer; include_usage adds a final usage chunk."""
    c = client(server)
    whole = chat(server, "t2")
    stream = c.chat.completions.create(model="t2", messages=Q, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == whole and finish == "length" and usage.completion_tokens == 12
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="t3", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert text == c.completions.create(model="t3", prompt="Once upon a time", max_tokens=10, temperature=0).choices[0].text


def test_adapter_changes_per_request(server: str) -> None:
    """Each request runs with the adapter its `model` names; n=2 with a seed gives two reproducible choices."""
    answers = {m: chat(server, m) for m in [BASE, *TENANTS[:4]]}
    assert len(set(answers.values())) == 5
    r1 = client(server).chat.completions.create(model="t1", messages=Q, max_tokens=8, n=2, seed=5, temperature=1.0)
    r2 = client(server).chat.completions.create(model="t1", messages=Q, max_tokens=8, n=2, seed=5, temperature=1.0)
    assert [c.message.content for c in r1.choices] == [c.message.content for c in r2.choices]
    assert len(r1.choices) == 2


def test_tenant_isolation(server: str) -> None:
    """A key reaches only its adapters (403 otherwise); no key or a wrong key is 401; /v1/models is filtered."""
    assert chat(server, "t0", key=LEGAL)
    assert chat(server, BASE, key=LEGAL)
    with pytest.raises(openai.PermissionDeniedError):
        chat(server, "t1", key=LEGAL)
    with pytest.raises(openai.PermissionDeniedError):
        chat(server, BASE, key=NOBASE)
    with pytest.raises(openai.AuthenticationError):
        chat(server, BASE, key="sk-wrong")
    assert httpx.post(server + "/v1/chat/completions", json={"model": BASE, "messages": Q}).status_code == 401
    ids = [m.id for m in client(server, LEGAL).models.list().data]
    assert ids == [BASE, "t0"]
    every = {m.id: m for m in client(server).models.list().data}
    assert set(TENANTS) <= set(every) and every["t5"].model_extra["parent"] == BASE


def _post(url: str, path: str, body: object, key: str = ADMIN) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_load_unload_promote(server: str, adapter_factory: Callable[..., Path]) -> None:
    """vLLM's load/unload bodies; a second version loaded without promotion is reachable as name@2 until promoted."""
    v1, v2 = adapter_factory("srv_v1", r=8, seed=401), adapter_factory("srv_v2", r=8, targets=ALL, seed=402)
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(v1)}, key=LEGAL).status_code == 403
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(v1)})
    assert r.status_code == 200 and r.json()["version"] == "1"
    one = chat(server, "fresh")
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(v2), "promote": False})
    assert r.json()["version"] == "2"
    two = chat(server, "fresh@2")
    assert one != two and chat(server, "fresh") == one
    assert _post(server, "/v1/promote_lora_adapter", {"lora_name": "fresh", "version": "2"}).status_code == 200
    assert chat(server, "fresh") == two
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(server, "fresh")
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 404
    bad = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"})
    assert bad.status_code == 404 and "does not exist" in bad.json()["error"]["message"]


@pytest.mark.parametrize(("route", "body", "text"), [
    ("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "/tmp"}, "invalid adapter name"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp", "version": "a/b"}, "invalid adapter version"),
    ("/v1/unload_lora_adapter", {"lora_name": "a b"}, "invalid adapter name"),
    ("/v1/promote_lora_adapter", {"lora_name": "t0", "version": ".."}, "invalid adapter version"),
    ("/v1/pin_lora_adapter", {"lora_name": "/etc", "pinned": True}, "invalid adapter name"),
])
def test_admin_routes_refuse_bad_names(server: str, route: str, body: dict[str, object], text: str) -> None:
    """An admin op's name and version are checked where the op is made, in the route: a 400 naming the field, in
    OpenAI's error shape, and the server goes on serving."""
    r = _post(server, route, body)
    assert r.status_code == 400, r.text
    assert text in r.json()["error"]["message"]
    assert chat(server, BASE)


@pytest.mark.parametrize(("body", "status", "text"), [
    ({"model": BASE, "messages": Q, "temperature": -1}, 400, "temperature"),
    ({"model": BASE, "messages": Q, "top_p": 0}, 400, "top_p"),
    ({"model": BASE, "messages": Q, "logprobs": True, "top_logprobs": 21}, 400, "logprobs must be in [0, 20]"),
    ({"model": BASE, "messages": Q, "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    ({"model": BASE, "messages": Q, "logit_bias": {"x": 1}}, 400, "logit_bias keys must be token ids"),
    ({"model": BASE, "messages": Q, "logit_bias": {"99999": 1}}, 400, "logit_bias: token ids must be in"),
    ({"model": BASE, "messages": Q, "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]"),
    ({"model": BASE, "messages": Q, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": BASE, "messages": Q, "functions": [{"name": "f"}]}, 400, "functions is not supported"),
    ({"model": BASE, "messages": Q, "modalities": ["text", "audio"]}, 400, "modalities"),
    ({"model": BASE, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "max_model_len"),
    ({"model": "nobody", "messages": Q}, 404, "not found"),
    ({"model": "t0@9", "messages": Q}, 404, "no version '9'"),
    ({"model": "../etc", "messages": Q}, 400, "invalid adapter name"),
    ({"model": BASE}, 400, "messages"),
    ({"model": BASE, "messages": "hi"}, 400, "messages"),
    ({"model": BASE, "messages": Q, "max_tokens": "many"}, 400, "max_tokens"),
])
def test_error_statuses(server: str, body: dict[str, object], status: int, text: str) -> None:
    """Each client mistake gets its status, in OpenAI's error shape, naming the cause; never a 500."""
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert text in err["message"] and err["type"] == "invalid_request_error" and isinstance(err["code"], str), err


def test_invalid_json_is_400(server: str) -> None:
    r = httpx.post(server + "/v1/completions", content=b"{nope", headers={"Authorization": f"Bearer {ADMIN}",
                                                                           "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_queue_full_is_503(server: str) -> None:
    """Past the bounded queue the server answers 503 with Retry-After, and serves again once there is room."""
    state = STATES[server]
    saved = state.max_in_flight
    state.max_in_flight = state.in_flight
    try:
        r = _post(server, "/v1/chat/completions", {"model": BASE, "messages": Q, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] and "capacity" in r.json()["error"]["message"]
    finally:
        state.max_in_flight = saved
    assert _post(server, "/v1/chat/completions", {"model": BASE, "messages": Q, "max_tokens": 2}).status_code == 200


def _wait_idle(url: str) -> None:
    for _ in range(200):
        if metric(url, "loraplex_running_requests", key=ADMIN) == 0 and metric(url, "loraplex_queue_depth", key=ADMIN) == 0:
            return
        time.sleep(0.05)
    raise AssertionError("requests still in flight")


def test_disconnect_aborts_and_frees_capacity(server: str) -> None:
    """A streaming client that hangs up, and a non-streaming one that times out, both have their request aborted:
    the metrics show the KV blocks and the running slot freed."""
    _wait_idle(server)
    used_before = metric(server, "loraplex_kv_cache_blocks", 'state="used"', key=ADMIN)
    body = {"model": "t4", "messages": Q, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        lines = r.iter_lines()
        for _ in range(7):  # a few events in; the connection stays open
            next(lines)
        assert metric(server, "loraplex_running_requests", key=ADMIN) == 1
        assert metric(server, "loraplex_kv_cache_blocks", 'state="used"', key=ADMIN) > used_before
    _wait_idle(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json={**body, "stream": False},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=1.0)
    _wait_idle(server)
    assert metric(server, "loraplex_kv_cache_blocks", 'state="used"', key=ADMIN) == used_before
    assert STATES[server].in_flight == 0
    assert metric(server, "loraplex_requests_total", 'model="t4",status="499"', key=ADMIN) == 2


@pytest.mark.slow
def test_64_concurrent_requests_across_8_adapters(server: str) -> None:
    """64 concurrent requests over 8 adapters all succeed, each with its solo answer."""
    prompts = ["Name a colour.", "What is 2 + 2?"]
    jobs = [(prompts[i % 2], TENANTS[(i // 2) % 8]) for i in range(64)]
    c = client(server)

    def solo(p: str, m: str) -> str:
        r = c.chat.completions.create(model=m, messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0)
        return r.choices[0].message.content or ""

    alone = {(p, m): solo(p, m) for p, m in set(jobs)}

    async def together() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=server + "/v1", api_key=ADMIN, max_retries=0)
        rs = await asyncio.gather(*(ac.chat.completions.create(
            model=m, messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0) for p, m in jobs))
        await ac.close()
        return [r.choices[0].message.content or "" for r in rs]

    assert asyncio.run(together()) == [alone[j] for j in jobs]


def test_generate_endpoint(server: str) -> None:
    """POST /generate {tenant_id, prompt} -> {response}; the tenant's adapter applies; unknown tenant is 404."""
    r = _post(server, "/generate", {"tenant_id": "t0", "prompt": "What is the capital of France?", "max_tokens": 12})
    assert r.status_code == 200 and r.json()["response"] == chat(server, "t0")
    base = _post(server, "/generate", {"prompt": "What is the capital of France?", "max_tokens": 12}).json()
    assert "Paris" in base["response"]
    assert _post(server, "/generate", {"tenant_id": "t1", "prompt": "x"}, key=LEGAL).status_code == 403
    assert _post(server, "/generate", {"tenant_id": "ghost", "prompt": "x"}).status_code == 404


def test_metrics_per_adapter(server: str) -> None:
    """/metrics carries per-adapter request counts, TTFT and per-token latency, and the adapter cache; /v1/models
    where each adapter version is held."""
    chat(server, "t6")
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    for needle in ['loraplex_requests_total{model="t6",status="200"}', 'loraplex_time_to_first_token_seconds_count{model="t6"}',
                   'loraplex_time_per_output_token_seconds_count{model="t6"}', 'loraplex_adapter_loads_total{tier="device"}',
                   "loraplex_adapter_load_seconds_bucket", "loraplex_queue_depth", "loraplex_batch_tokens"]:
        assert needle in text, needle
    # /v1/models says where the version that answered is held: in host memory and, just used, in a device slot.
    t6 = next(m for m in httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
              if m["id"] == "t6")
    assert t6["resident_on"] == [{"replica": "local", "version": t6["version"], "tiers": ["device", "host"]}]


def test_prefix_cache_over_http(server: str) -> None:
    """A repeated prompt reports its cached tokens in usage; a cache salt gets a namespace of its own; the hits
    show per model on /metrics and in /v1/models; the admin-only reset empties the cache."""
    long_q = [{"role": "user", "content": "Tell me about the prefix cache test, " + "again and again, " * 30}]
    c = client(server)

    def cached(model: str, **kw: object) -> int:
        r = c.chat.completions.create(model=model, messages=long_q, max_tokens=2, temperature=0, **kw)
        assert r.usage.prompt_tokens > 100
        return r.usage.prompt_tokens_details.cached_tokens

    first, second = cached("t2"), cached("t2")
    assert second >= 96 and second > first  # the whole prompt but its last partial block
    assert cached("t3") < 96, "another adapter found t2's blocks"
    assert cached("t2", extra_body={"cache_salt": "user-1"}) < 96 and cached("t2", extra_body={"cache_salt": "user-1"}) >= 96
    assert metric(server, "loraplex_prefix_cache_hits_total", 'model="t2"', key=ADMIN) >= 2 * 96
    assert 0 < metric(server, "loraplex_prefix_cache_hit_rate", key=ADMIN) <= 1
    pc = next(m for m in httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
              if m["parent"] is None)["memory"]["prefix_cache"]
    assert pc["enabled"] and pc["cached_blocks"] > 0 and pc["hits_tokens"] > 0
    assert _post(server, "/reset_prefix_cache", {}, key=LEGAL).status_code == 403
    r = _post(server, "/reset_prefix_cache", {})
    assert r.status_code == 200 and r.json()["cached_blocks_dropped"] > 0
    assert cached("t2") == 0
    bad = httpx.post(server + "/v1/chat/completions", json={"model": "t2", "messages": Q, "cache_salt": ""},
                     headers={"Authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400 and "cache_salt" in bad.text


def test_logprobs_in_openais_shapes(server: str) -> None:
    """Chat: logprobs.content with top_logprobs, streamed deltas reassembling to the same; completions: the four
    parallel lists. The chosen token is the most likely one under greedy decoding."""
    c = client(server)
    r = c.chat.completions.create(model="t1", messages=Q, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    streamed = []
    for chunk in c.chat.completions.create(model="t1", messages=Q, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    plain = c.chat.completions.create(model="t1", messages=Q, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    comp = c.completions.create(model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_penalties_and_bias_reach_the_sampler(server: str) -> None:
    """A huge bias on one token makes greedy decoding pick it; penalties change a repetitive answer."""
    c = client(server)
    tok = STATES[server].engine.tokenizer
    target = tok.encode(" banana", add_special_tokens=False)[0]
    r = c.completions.create(model=BASE, prompt="My favourite fruit is", max_tokens=3, temperature=0,
                             logit_bias={str(target): 100})
    assert r.choices[0].text == tok.decode([target]) * 3
    q = [{"role": "user", "content": "Say the word dog ten times."}]
    base = c.chat.completions.create(model=BASE, messages=q, max_tokens=20, temperature=0)
    pen = c.chat.completions.create(model=BASE, messages=q, max_tokens=20, temperature=0, frequency_penalty=2,
                                    presence_penalty=2)
    assert pen.choices[0].message.content != base.choices[0].message.content
    extra = c.chat.completions.create(model=BASE, messages=q, max_tokens=20, temperature=0,
                                      extra_body={"repetition_penalty": 1.5, "min_p": 0.1, "bad_words": ["dog"]})
    assert extra.choices[0].message.content not in (base.choices[0].message.content, pen.choices[0].message.content)


def test_tokenize_and_detokenize(server: str) -> None:
    r = _post(server, "/tokenize", {"model": BASE, "prompt": "Hello world", "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 512
    back = _post(server, "/detokenize", {"model": BASE, "tokens": r.json()["tokens"]})
    assert back.json()["prompt"] == "Hello world"
    chat_tokens = _post(server, "/tokenize", {"model": "t0", "messages": Q}).json()["tokens"]
    assert chat_tokens == STATES[server].engine.tokenizer.encode(
        STATES[server].engine.tokenizer.apply_chat_template(Q, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)
    assert _post(server, "/tokenize", {"model": "t0", "prompt": "x"}, key=LEGAL).status_code == 200
    assert _post(server, "/tokenize", {"model": "t2", "prompt": "x"}, key=LEGAL).status_code == 403
    assert _post(server, "/detokenize", {"tokens": [-1]}).status_code == 400
    assert _post(server, "/tokenize", {"prompt": "x", "messages": Q}).status_code == 400


def test_continuous_usage_stats(server: str) -> None:
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    usages = []
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usages.append(json.loads(line[6:]).get("usage"))
    assert all(u is not None for u in usages)
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == 5 and usages[0]["prompt_tokens"] == usages[-1]["prompt_tokens"]


def test_completions_echo(server: str) -> None:
    c = client(server)
    r = c.completions.create(model=BASE, prompt="The capital of France is", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("The capital of France is") and len(r.choices[0].text) > 24
    r = c.completions.create(model="t1", prompt="The capital of France is", max_tokens=3, temperature=0, echo=True,
                             logprobs=1)
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset == sorted(lp.text_offset)
    chunks = [ch.choices[0].text for ch in c.completions.create(model="t1", prompt="The capital of France is",
                                                                max_tokens=3, temperature=0, echo=True, stream=True)]
    assert "".join(chunks) == r.choices[0].text
