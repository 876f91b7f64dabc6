"""A request body as engine inputs: sampling params (and structured outputs), chat rendering and tokenization (on a
prepare worker, never the event loop), the n choices, the room left in the context. The streams themselves:
server/request_job.py; each request's metrics: server/stats/tracker.py."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from loraplex.engine.prepare import PreparePool, Stage
from loraplex.errors import InvalidRequestError
from loraplex.sampling import SamplingParams, StructuredOutput
from loraplex.server import tools
from loraplex.server.errors import APIError, bad_request
from loraplex.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields


def _logprobs(body: SamplingFields) -> int | None:
    """How many top log-probabilities per token the body asks for (None: none). Chat: `logprobs: true` and
    `top_logprobs` (0-20); completions: `logprobs` as that number; /generate returns none, so refuses them."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and body.logprobs is not True:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        if isinstance(body.logprobs, bool) or body.logprobs is None:
            return (body.top_logprobs or 0) if body.logprobs else None
        raise APIError(400, "logprobs must be a boolean on chat completions (the number goes in top_logprobs)",
                       "invalid_value", "logprobs")
    if body.top_logprobs is not None:
        raise APIError(400, "top_logprobs is a chat completions field; completions take logprobs: <int>",
                       "invalid_value", "top_logprobs")
    if isinstance(body, CompletionRequest):
        if isinstance(body.logprobs, bool):
            raise APIError(400, "logprobs must be an integer on completions", "invalid_value", "logprobs")
        return body.logprobs
    if body.logprobs not in (None, False):
        raise APIError(400, "logprobs is not returned by /generate; use /v1/completions", "invalid_value", "logprobs")
    return None


def _logit_bias(body: SamplingFields) -> dict[int, float]:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = float(value)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", "invalid_value", "logit_bias") from None
    return bias


def structured_output(body: SamplingFields) -> StructuredOutput | None:
    """The output constraint a body asks for: OpenAI's response_format, vLLM's structured_outputs or guided_*."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = body.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(("response_format", StructuredOutput("json_object")))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object", "response_format")
            found.append(("response_format", StructuredOutput("json_schema", json.dumps(schema))))
        elif kind != "text":
            raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}", "response_format")
    so = dict(body.structured_outputs or {})
    extras = {"json": body.guided_json, "regex": body.guided_regex, "choice": body.guided_choice,
              "grammar": body.guided_grammar}
    for key, value in [*so.items(), *((k, v) for k, v in extras.items() if v is not None)]:
        if key == "json":
            text = value if isinstance(value, str) else json.dumps(value)
            found.append((key, StructuredOutput("json_schema", text)))
        elif key == "json_object" and value:
            found.append((key, StructuredOutput("json_object")))
        elif key == "regex" and isinstance(value, str):
            found.append((key, StructuredOutput("regex", value)))
        elif key == "choice" and isinstance(value, list) and value and all(isinstance(c, str) for c in value):
            found.append((key, StructuredOutput("choice", json.dumps(value))))
        elif key == "grammar" and isinstance(value, str):
            found.append((key, StructuredOutput("grammar", value)))
        elif key not in ("json_object",):
            raise bad_request(f"structured output {key!r} is not supported or malformed (json, json_object, regex, choice "
                       "(a non-empty list of strings), grammar)", "structured_outputs")
    if len(found) > 1:
        raise bad_request(f"give one output constraint, got {', '.join(k for k, _ in found)}", "structured_outputs")
    return found[0][1] if found else None


def sampling_params(body: SamplingFields, max_tokens: int, default_temperature: float = 1.0) -> SamplingParams:
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
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=_logit_bias(body),
        min_p=body.min_p or 0.0,
        allowed_token_ids=body.allowed_token_ids,
        bad_words=list(body.bad_words or []),
        logprobs=_logprobs(body),
        structured=structured_output(body),
    )


def render_chat(tokenizer: Any, messages: list[ChatMessage], fns: list[dict[str, Any]] | None = None) -> list[int]:
    """Chat messages (and the functions offered, server/tools.py) through the model's chat template -> token ids."""
    rendered = []
    for m in messages:
        content = m.content or ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"message content part of type {part.get('type')!r} is not supported; "
                                   "only text", "invalid_value", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if m.tool_calls:
            content = tools.history_text(content, m.tool_calls)
        rendered.append({"role": "system" if m.role == "developer" else m.role, "content": content,
                         **({"name": m.name} if m.name is not None else {})})
    kwargs: dict[str, Any] = {}
    if fns:
        if "tools" in (tokenizer.chat_template or ""):  # the template renders tools itself
            kwargs["tools"] = [{"type": "function", "function": f} for f in fns]
        elif rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + tools.system_prompt(fns)}
        else:
            rendered.insert(0, {"role": "system", "content": tools.system_prompt(fns)})
    if not rendered:
        raise APIError(400, "messages must hold at least one message", "invalid_value", "messages")
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception as e:  # the template's own checks (jinja raise_exception, wrong roles or order)
        raise APIError(400, f"the model's chat template cannot render these messages: {e}", "invalid_value",
                       "messages") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


async def rendered_chat(pool: PreparePool, tokenizer: Any, messages: list[ChatMessage],
                        fns: list[dict[str, Any]] | None = None) -> list[int]:
    """render_chat on a prepare worker under --max-prepare-seconds (engine/prepare.py): the event loop never runs
    a chat template or the tokenizer, so streams and /health go on while a huge conversation renders."""
    return await pool.run(Stage("rendering the messages through the chat template"), render_chat, tokenizer,
                          messages, fns)


async def encoded(pool: PreparePool, tokenizer: Any, texts: list[str],
                  add_special_tokens: bool = True) -> list[list[int]]:
    """The token ids of each text, tokenized on a prepare worker under --max-prepare-seconds."""
    def encode() -> list[list[int]]:
        return [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]

    return await pool.run(Stage("tokenizing the prompt"), encode)


async def decoded(pool: PreparePool, tokenizer: Any, token_lists: list[list[int]]) -> list[str]:
    """The text of each token list, decoded on a prepare worker under --max-prepare-seconds."""
    def decode() -> list[str]:
        return [str(tokenizer.decode(ids)) for ids in token_lists]

    return await pool.run(Stage("decoding the tokens"), decode)


def check_room(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """An explicit max_tokens the context cannot hold is refused (vLLM's 400), not silently cut at the context's
    end: the client learns how much room there is."""
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise bad_request(f"max_tokens {max_tokens} + the prompt's {prompt_tokens} tokens exceed the context "
                          f"(max_model_len {max_model_len}); ask for at most {max(max_model_len - prompt_tokens, 0)} "
                          "tokens", "max_tokens")


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices; with a seed, choice i uses seed + i so they differ yet stay reproducible."""
    if n < 1 or n > 16:
        raise InvalidRequestError(f"n must be in [1, 16], got {n}")
    return [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]
