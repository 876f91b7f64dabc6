"""Every request field is honoured or a 400 naming it: unknown fields, vLLM's and OpenAI's fields this server does
not implement (server/extras.py), malformed bodies; errors in OpenAI's shape, type and code, through the openai
client as a user meets them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from conftest import ATTN
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.auth import KeyScope
from loraplex.server.extras import CHAT, COMPLETION
from loraplex.server.generation import render_chat
from loraplex.server.protocol import ChatMessage
from server_util import running

BASE = "SmolLM2-135M-Instruct"
KEY = "sk-fields"
HI = [{"role": "user", "content": "Hi"}]
CHAT_BODY = {"model": BASE, "messages": HI, "max_tokens": 2, "temperature": 0}
TEXT_BODY = {"model": BASE, "prompt": "Hi", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(adapter_factory: Callable[..., Path]) -> Iterator[str]:
    mods = (("a", str(adapter_factory("fields_a", r=4, targets=ATTN, seed=91))),)
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=mods, max_model_len=256, max_loras=2))
    app = build_app(engine, keys={KEY: KeyScope(frozenset({"*"}), admin=True)})
    with running(app) as url:
        yield url


def post(url: str, path: str, body: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def error_of(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), error
    return error


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {**CHAT_BODY, "temprature": 0.5}, "temprature"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{**HI[0], "contnet": "x"}]}, "messages.0.contnet"),
    ("/v1/chat/completions", {**CHAT_BODY, "stream_options": {"include_usage": True, "every": 1}},
     "stream_options.every"),
    ("/v1/completions", {**TEXT_BODY, "max_token": 5}, "max_token"),
    ("/generate", {"prompt": "Hi", "tenant": "a"}, "tenant"),
    ("/tokenize", {"prompt": "Hi", "return_token_strs": True}, "return_token_strs"),
    ("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/nowhere", "base_model": BASE}, "base_model"),
])
def test_an_unknown_field_is_a_400_naming_it(server: str, path: str, body: dict[str, Any], param: str) -> None:
    """A misspelt or unknown field is never ignored: the client learns its request was not what it meant."""
    error = error_of(post(server, path, body))
    assert error["code"] == "unknown_parameter" and error["param"] == param, error
    assert repr(param) in error["message"], error


# One value per refused field that asks for something (any value outside the field's defaults).
ASKING: dict[str, Any] = {"skip_special_tokens": False,
                          "spaces_between_special_tokens": False, "truncate_prompt_tokens": 8,
                          "truncation_side": "left", "prompt_logprobs": 1, "logprob_token_ids": [1],
                          "watermarking": True, "session_id": "s", "return_tokens_as_token_ids": True,
                          "return_token_ids": True, "return_token_offsets": True, "return_mm_kwargs": False,
                          "routed_experts_prompt_start": 1, "kv_transfer_params": {"x": 1},
                          "ec_transfer_params": {"x": 1}, "vllm_xargs": {"x": 1}, "logits_processors": ["m.P"],
                          "repetition_detection": {"n": 2}, "thinking_token_budget": 5, "stream_interval": 4,
                          "structural_tag": "{}", "guided_decoding_backend": "xgrammar",
                          "guided_whitespace_pattern": " ", "prompt_embeds": "AAAA", "store": True,
                          "metadata": {"k": "v"}, "service_tier": "flex", "functions": [{"name": "f"}],
                          "function_call": "auto", "audio": {"voice": "x"}, "modalities": ["text", "audio"],
                          "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
                          "reasoning_effort": "low", "include_reasoning": False, "verbosity": "low", "echo": True,
                          "add_generation_prompt": False, "continue_final_message": True, "add_special_tokens": True,
                          "chat_template": "{{ messages }}", "chat_template_kwargs": {"x": 1},
                          "documents": [{"text": "x"}], "mm_processor_kwargs": {"x": 1},
                          "media_io_kwargs": {"x": 1}, "suffix": "end"}


def test_every_refused_field_has_a_case() -> None:
    assert set(CHAT) | set(COMPLETION) == set(ASKING)


@pytest.mark.parametrize(("path", "field"), [*(("/v1/chat/completions", f) for f in CHAT),
                                             *(("/v1/completions", f) for f in COMPLETION if f not in CHAT)])
def test_a_field_not_implemented_is_refused_by_name(server: str, path: str, field: str) -> None:
    body = CHAT_BODY if path == "/v1/chat/completions" else TEXT_BODY
    error = error_of(post(server, path, {**body, field: ASKING[field]}))
    assert error["code"] == "unsupported_parameter" and error["param"] == field, error
    assert error["message"].startswith(f"{field} is not supported by this server ("), error


def test_the_refusal_never_echoes_the_value(server: str) -> None:
    huge = "x" * 200_000
    error = error_of(post(server, "/v1/completions", {**TEXT_BODY, "suffix": huge}))
    assert error["param"] == "suffix" and len(error["message"]) < 300, error


def test_defaults_sent_explicitly_are_served(server: str) -> None:
    """vLLM's clients send extras at their defaults: those ask for nothing and are served as without them."""
    defaults = {"use_beam_search": False, "length_penalty": 1.0, "skip_special_tokens": True, "priority": 0,
                "spaces_between_special_tokens": True, "truncate_prompt_tokens": None, "store": False,
                "service_tier": "auto", "stream_interval": 1}
    plain = post(server, "/v1/chat/completions", CHAT_BODY).json()["choices"][0]["message"]
    chat = post(server, "/v1/chat/completions", {**CHAT_BODY, **defaults, "add_generation_prompt": True,
                                                 "continue_final_message": False, "echo": False,
                                                 "modalities": ["text"], "chat_template_kwargs": {}})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"] == plain, chat.text
    text = post(server, "/v1/completions", {**TEXT_BODY, **defaults, "suffix": None})
    assert text.status_code == 200, text.text


def test_false_is_not_zero(server: str) -> None:
    """routed_experts_prompt_start's default is 0: false is a boolean, not that number."""
    error = error_of(post(server, "/v1/chat/completions", {**CHAT_BODY, "routed_experts_prompt_start": False}))
    assert error["param"] == "routed_experts_prompt_start", error


def test_beam_search_is_refused_where_it_does_not_run(server: str) -> None:
    """/generate has no beam search (chat and completions do: tests/test_beam_search.py)."""
    error = error_of(post(server, "/generate", {"prompt": "Hi", "use_beam_search": True, "length_penalty": 0.5}))
    assert error["code"] == "unsupported_parameter" and error["param"] == "use_beam_search", error


@pytest.mark.parametrize(("content", "code", "param"), [
    (b"{nope", "invalid_json", None),
    (b'{"model": "SmolLM2-135M-Instruct"}', "missing_required_parameter", "messages"),
    (b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "robot", "content": "x"}]}', "invalid_type",
     "messages.0.role"),
    (b'[1, 2]', "invalid_type", None),
])
def test_malformed_bodies_are_400s(server: str, content: bytes, code: str, param: str | None) -> None:
    r = httpx.post(server + "/v1/chat/completions", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    error = error_of(r)
    assert error["code"] == code and error["param"] == param, error


def test_openai_error_codes_through_the_client(server: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client(server).chat.completions.create(model="nobody", messages=HI, max_tokens=1)
    assert missing.value.code == "model_not_found" and missing.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(server, key="sk-wrong").models.list()
    assert wrong.value.code == "invalid_api_key" and wrong.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as long:
        client(server).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "word " * 400}])
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).chat.completions.create(model=BASE, messages=HI, temperature=-1)
    assert bad.value.code == "invalid_value" and "temperature" in bad.value.message


def test_request_id_names_the_response(server: str) -> None:
    """vLLM's request_id: the response's id is built from it, as vLLM builds it."""
    chat = post(server, "/v1/chat/completions", {**CHAT_BODY, "request_id": "trace-17"}).json()
    text = post(server, "/v1/completions", {**TEXT_BODY, "request_id": "trace-18"}).json()
    assert chat["id"] == "chatcmpl-trace-17" and text["id"] == "cmpl-trace-18"
    assert post(server, "/v1/chat/completions", CHAT_BODY).json()["id"].startswith("chatcmpl-")


def test_add_special_tokens_on_completions(server: str) -> None:
    """vLLM's add_special_tokens: the prompt is tokenized with or without them, as /tokenize says."""
    for flag in (True, False):
        want = post(server, "/tokenize", {"prompt": "Hi there", "add_special_tokens": flag}).json()["count"]
        r = post(server, "/v1/completions", {**TEXT_BODY, "prompt": "Hi there", "add_special_tokens": flag})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == want, r.text


def test_a_message_name_reaches_the_template(default_model_dir: Path) -> None:
    """OpenAI's message `name` is passed to the chat template, which may render it."""
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.chat_template = "{% for m in messages %}[{{ m.name or '-' }}] {{ m.content }}\n{% endfor %}"
    named = render_chat(tok, [ChatMessage(role="user", content="Hi", name="ann"),
                              ChatMessage(role="user", content="Yo")])
    assert tok.decode(named) == "[ann] Hi\n[-] Yo\n"
