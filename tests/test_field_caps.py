"""Every list and string of a request body is capped (server/protocol.py): a body just over a cap is a 400 naming
the field and the limit, before any tokenizing or rendering, and the server goes on serving."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from loraplex.server import protocol as p

BASE = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]
CHAT = {"model": BASE, "messages": HI, "max_tokens": 1}
TEXT = {"model": BASE, "prompt": "Hi", "max_tokens": 1}


def tool(name: str = "f", description: str = "", parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": parameters or {"type": "object", "properties": {}}}}


def call(i: int) -> dict[str, Any]:
    return {"id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def over(limit: int) -> str:
    return "x" * (limit + 1)


# (id, path, body, the field the error names, the limit it gives)
CASES: list[tuple[str, str, dict[str, Any], str, int]] = [
    ("model", "/v1/chat/completions", {**CHAT, "model": over(p.MAX_MODEL_CHARS)}, "model", p.MAX_MODEL_CHARS),
    ("messages", "/v1/chat/completions", {**CHAT, "messages": HI * (p.MAX_MESSAGES + 1)}, "messages", p.MAX_MESSAGES),
    ("content", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": over(p.MAX_CONTENT_CHARS)}]},
     "messages.0.content", p.MAX_CONTENT_CHARS),
    ("content_parts", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * (p.MAX_CONTENT_PARTS + 1)}]},
     "messages.0.content", p.MAX_CONTENT_PARTS),
    ("content_parts_text", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": over(p.MAX_CONTENT_CHARS // 2)}] * 2}]},
     "messages.0.content", p.MAX_CONTENT_CHARS),
    ("tool_calls", "/v1/chat/completions",
     {**CHAT, "messages": [*HI, {"role": "assistant", "tool_calls": [call(i) for i in range(p.MAX_TOOL_CALLS + 1)]}]},
     "messages.1.tool_calls", p.MAX_TOOL_CALLS),
    ("tool_call_id", "/v1/chat/completions",
     {**CHAT, "messages": [*HI, {"role": "tool", "tool_call_id": over(p.MAX_ID_CHARS), "content": "ok"}]},
     "messages.1.tool_call_id", p.MAX_ID_CHARS),
    ("stop_count", "/v1/chat/completions", {**CHAT, "stop": ["a"] * (p.MAX_STOP + 1)}, "stop", p.MAX_STOP),
    ("stop_string", "/v1/chat/completions", {**CHAT, "stop": over(p.MAX_STOP_CHARS)}, "stop", p.MAX_STOP_CHARS),
    ("stop_list_string", "/v1/chat/completions", {**CHAT, "stop": ["a", over(p.MAX_STOP_CHARS)]}, "stop",
     p.MAX_STOP_CHARS),
    ("stop_token_ids", "/v1/chat/completions", {**CHAT, "stop_token_ids": [1] * (p.MAX_STOP_TOKEN_IDS + 1)},
     "stop_token_ids", p.MAX_STOP_TOKEN_IDS),
    ("cache_salt", "/v1/chat/completions", {**CHAT, "cache_salt": over(p.MAX_ID_CHARS)}, "cache_salt", p.MAX_ID_CHARS),
    ("user", "/v1/chat/completions", {**CHAT, "user": over(p.MAX_ID_CHARS)}, "user", p.MAX_ID_CHARS),
    ("logit_bias", "/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(p.MAX_LOGIT_BIAS + 1)}},
     "logit_bias", p.MAX_LOGIT_BIAS),
    ("allowed_token_ids", "/v1/chat/completions",
     {**CHAT, "allowed_token_ids": [1] * (p.MAX_ALLOWED_TOKEN_IDS + 1)}, "allowed_token_ids", p.MAX_ALLOWED_TOKEN_IDS),
    ("bad_words", "/v1/chat/completions", {**CHAT, "bad_words": ["a"] * (p.MAX_BAD_WORDS + 1)}, "bad_words",
     p.MAX_BAD_WORDS),
    ("bad_word", "/v1/chat/completions", {**CHAT, "bad_words": ["a", over(p.MAX_BAD_WORD_CHARS)]}, "bad_words.1",
     p.MAX_BAD_WORD_CHARS),
    ("response_format", "/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"description": over(p.MAX_SCHEMA_CHARS)}}}},
     "response_format", p.MAX_SCHEMA_CHARS),
    ("structured_outputs", "/v1/chat/completions", {**CHAT, "structured_outputs": {"regex": over(p.MAX_SCHEMA_CHARS)}},
     "structured_outputs", p.MAX_SCHEMA_CHARS),
    ("guided_json", "/v1/chat/completions", {**CHAT, "guided_json": over(p.MAX_SCHEMA_CHARS)}, "guided_json",
     p.MAX_SCHEMA_CHARS),
    ("guided_regex", "/v1/chat/completions", {**CHAT, "guided_regex": over(p.MAX_SCHEMA_CHARS)}, "guided_regex",
     p.MAX_SCHEMA_CHARS),
    ("guided_grammar", "/v1/chat/completions", {**CHAT, "guided_grammar": over(p.MAX_SCHEMA_CHARS)}, "guided_grammar",
     p.MAX_SCHEMA_CHARS),
    ("guided_choice", "/v1/chat/completions", {**CHAT, "guided_choice": ["a"] * (p.MAX_CHOICES + 1)}, "guided_choice",
     p.MAX_CHOICES),
    ("guided_choice_text", "/v1/chat/completions", {**CHAT, "guided_choice": [over(p.MAX_SCHEMA_CHARS // 2)] * 2},
     "guided_choice", p.MAX_SCHEMA_CHARS),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [tool(f"f{i}") for i in range(p.MAX_TOOLS + 1)]}, "tools",
     p.MAX_TOOLS),
    ("tool_name", "/v1/chat/completions", {**CHAT, "tools": [tool(over(p.MAX_TOOL_NAME_CHARS))]}, "tools",
     p.MAX_TOOL_NAME_CHARS),
    ("tool_description", "/v1/chat/completions", {**CHAT, "tools": [tool(description=over(p.MAX_TOOL_DESCRIPTION_CHARS))]},
     "tools", p.MAX_TOOL_DESCRIPTION_CHARS),
    ("tool_parameters", "/v1/chat/completions",
     {**CHAT, "tools": [tool("g"), tool(parameters={"type": "object", "description": over(p.MAX_SCHEMA_CHARS)})]},
     "tools", p.MAX_SCHEMA_CHARS),
    ("tool_choice", "/v1/chat/completions",
     {**CHAT, "tools": [tool()], "tool_choice": {"type": "function", "function": {"name": over(p.MAX_TOOL_CHOICE_CHARS)}}},
     "tool_choice", p.MAX_TOOL_CHOICE_CHARS),
    ("request_id", "/v1/chat/completions", {**CHAT, "request_id": over(p.MAX_ID_CHARS)}, "request_id", p.MAX_ID_CHARS),
    ("message_name", "/v1/chat/completions", {**CHAT, "messages": [{**HI[0], "name": over(p.MAX_ID_CHARS)}]},
     "messages.0.name", p.MAX_ID_CHARS),
    ("prompt_string", "/v1/completions", {**TEXT, "prompt": over(p.MAX_PROMPT_CHARS)}, "prompt", p.MAX_PROMPT_CHARS),
    ("prompt_tokens", "/v1/completions", {**TEXT, "prompt": [1] * (p.MAX_PROMPT_TOKENS + 1)}, "prompt",
     p.MAX_PROMPT_TOKENS),
    ("prompts", "/v1/completions", {**TEXT, "prompt": ["Hi"] * (p.MAX_PROMPTS + 1)}, "prompt", p.MAX_PROMPTS),
    ("prompts_tokens", "/v1/completions", {**TEXT, "prompt": [[1], [1] * (p.MAX_PROMPT_TOKENS + 1)]}, "prompt",
     p.MAX_PROMPT_TOKENS),
    ("completions_stop", "/v1/completions", {**TEXT, "stop": ["a"] * (p.MAX_STOP + 1)}, "stop", p.MAX_STOP),
    ("generate_prompt", "/generate", {"prompt": over(p.MAX_CONTENT_CHARS)}, "prompt", p.MAX_CONTENT_CHARS),
    ("tenant_id", "/generate", {"prompt": "Hi", "tenant_id": over(p.MAX_MODEL_CHARS)}, "tenant_id", p.MAX_MODEL_CHARS),
    ("tokenize_prompt", "/tokenize", {"prompt": over(p.MAX_PROMPT_CHARS)}, "prompt", p.MAX_PROMPT_CHARS),
    ("tokenize_messages", "/tokenize", {"messages": HI * (p.MAX_MESSAGES + 1)}, "messages", p.MAX_MESSAGES),
    ("tokenize_model", "/tokenize", {"model": over(p.MAX_MODEL_CHARS), "prompt": "Hi"}, "model", p.MAX_MODEL_CHARS),
    ("detokenize", "/detokenize", {"tokens": [1] * (p.MAX_PROMPT_TOKENS + 1)}, "tokens", p.MAX_PROMPT_TOKENS),
    ("lora_name", "/v1/load_lora_adapter", {"lora_name": over(p.MAX_MODEL_CHARS), "lora_path": "/x"}, "lora_name",
     p.MAX_MODEL_CHARS),
    ("lora_path", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": over(p.MAX_PATH_CHARS)}, "lora_path",
     p.MAX_PATH_CHARS),
    ("load_version", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x", "version": over(p.MAX_VERSION_CHARS)},
     "version", p.MAX_VERSION_CHARS),
    ("promote_version", "/v1/promote_lora_adapter", {"lora_name": "a", "version": over(p.MAX_VERSION_CHARS)}, "version",
     p.MAX_VERSION_CHARS),
    ("unload", "/v1/unload_lora_adapter", {"lora_name": over(p.MAX_MODEL_CHARS)}, "lora_name", p.MAX_MODEL_CHARS),
    ("pin", "/v1/pin_lora_adapter", {"lora_name": over(p.MAX_MODEL_CHARS)}, "lora_name", p.MAX_MODEL_CHARS),
]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    from loraplex import EngineConfig
    from loraplex.engine.async_engine import AsyncLLMEngine
    from loraplex.server.app import build_app
    from loraplex.server.guard import GuardConfig
    from server_util import running

    engine = AsyncLLMEngine(EngineConfig(dtype="float32", max_model_len=512, kv_cache_memory=32 << 20))
    assert engine.facts.model_name == BASE
    # A body cap above the largest field cap, so that each field's own cap is what refuses it (not the 413).
    with running(build_app(engine, guard=GuardConfig(max_body_size=16 << 20))) as url:
        yield url


def served(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text


@pytest.mark.parametrize(("path", "body", "field", "limit"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_over_the_cap_is_a_400_naming_the_field(server: str, path: str, body: dict[str, Any], field: str,
                                                limit: int) -> None:
    r = httpx.post(server + path, json=body, timeout=120)
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field, error
    assert error["code"] in ("string_above_max_length", "array_above_max_length", "value_above_max_length"), error
    assert error["message"].startswith(f"{field} is over its limit") and str(limit) in error["message"], error
    assert len(error["message"]) < 300  # the hostile value is never echoed back
    served(server)


def test_at_the_caps_is_served(server: str) -> None:
    """Bodies at the caps (the cheap ones to run) are not refused by them."""
    r = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        **CHAT, "stop": ["\x00" * p.MAX_STOP_CHARS] * p.MAX_STOP, "bad_words": ["zq"] * 8,
        "logit_bias": {str(i): 0 for i in range(p.MAX_LOGIT_BIAS)}, "user": "u" * p.MAX_ID_CHARS,
        "cache_salt": "s" * p.MAX_ID_CHARS, "tools": [tool(f"f{i}") for i in range(p.MAX_TOOLS)], "tool_choice": "none"})
    assert r.status_code == 200, r.text[:500]
    r = httpx.post(server + "/detokenize", json={"tokens": [1] * 1000}, timeout=60)
    assert r.status_code == 200, r.text[:500]


def test_a_shape_error_is_a_400_of_its_own(server: str) -> None:
    """A body of the wrong shape is a 400 too (OpenAI's status), with the code of a wrong type, not of a cap."""
    r = httpx.post(server + "/v1/chat/completions", json={**CHAT, "stop": 3}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and "stop" in error["message"] and error["code"] == "invalid_type", r.text
