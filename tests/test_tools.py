"""Tool calling through the official openai client: required and named tool_choice always give calls that parse
into the function's arguments (validated against its parameters schema), on the base model and an adapter;
parallel_tool_calls=false gives one call; streamed tool-call deltas reassemble into the same calls; a `tool`
result is accepted on the next turn; `auto` reads Hermes-style <tool_call> blocks out of free text."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from conftest import ALL
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server import tools
from loraplex.server.app import build_app
from server_util import running

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
PARAMS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]


@pytest.fixture(scope="module")
def server(adapter_factory: Callable[..., Path]) -> Iterator[str]:
    mods = (("a", str(adapter_factory("tools-a", r=8, alpha=16, targets=ALL, seed=41))),)
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=mods, max_model_len=1024,
                                         kv_cache_memory=64 << 20))
    with running(build_app(engine)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def check_calls(calls: list, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["SmolLM2-135M-Instruct", "a"])
def test_required_and_named_calls_always_parse(server: str, model: str) -> None:
    """Sampled (two seeds) and greedy, parallel and single, required and named: sent together, so they share
    decode steps."""
    import concurrent.futures

    c = client(server)
    both = [WEATHER, TIME]
    asks = [dict(tool_choice="required", max_tokens=400, temperature=0.8, seed=i) for i in range(2)] + [
        dict(tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=80, temperature=0),
        dict(tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=0)]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(lambda kw: c.chat.completions.create(model=model, messages=ASK, tools=both, **kw), asks))
    for r in replies[:2]:
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})
    named, single = replies[2].choices[0].message.tool_calls, replies[3].choices[0].message.tool_calls
    check_calls(named, {"get_time"})
    check_calls(single, {"get_weather", "get_time"})
    assert len(named) == 1 and len(single) == 1


def test_streamed_calls_reassemble(server: str) -> None:
    c = client(server)
    kw = dict(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=400,
              temperature=0)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in c.chat.completions.create(**kw, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            if d.function.name:
                entry["name"] = d.function.name
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole]


def test_tool_results_next_turn_and_none(server: str) -> None:
    c = client(server)
    first = c.chat.completions.create(model="a", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=400,
                                      parallel_tool_calls=False, temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    r = c.chat.completions.create(model="a", messages=history, tools=[WEATHER], max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = c.chat.completions.create(model="a", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=10,
                                     temperature=0)
    plain = c.chat.completions.create(model="a", messages=ASK, max_tokens=10, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content  # not offered: the same prompt


def test_bad_tool_requests(server: str) -> None:
    base = {"model": "a", "messages": ASK, "max_tokens": 4}
    for extra, needle in (({"tool_choice": "required"}, "tool_choice needs tools"),
                          ({"tools": [{"type": "function"}]}, "each tool must be"),
                          ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                           "among the tools"),
                          ({"tools": [WEATHER, WEATHER]}, "unique"),
                          ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
                           "cannot be combined")):
        r = httpx.post(server + "/v1/chat/completions", json={**base, **extra}, timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (extra, r.text)


def test_auto_reads_tool_call_blocks() -> None:
    tp = tools.plan([WEATHER, TIME], "auto", None)
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '</tool_call><tool_call>{"name": "unknown", "arguments": {}}</tool_call>')
    message, finish = tools.to_message(text, "stop", tp)
    assert finish == "tool_calls" and message["content"] == "Let me check."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert tools.to_message("Just text.", "stop", tp) == ({"role": "assistant", "content": "Just text."}, "stop")
    assert "get_time" in tools.system_prompt(tp.tools)
