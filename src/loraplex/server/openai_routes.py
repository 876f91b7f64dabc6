"""POST /v1/chat/completions, /v1/completions and /generate: non-streaming and SSE streaming."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.engine.outputs import RequestOutput
from loraplex.errors import InvalidRequestError
from loraplex.server.errors import APIError, error_body, public_message, status_of
from loraplex.server import auth, logprobs, tools
from loraplex.server.generation import (Tracker, check_room, choice_params, collect, decoded, encoded, fingerprint,
                                        merged, open_streams, pinned_version, rendered_chat, sampling_params)
from loraplex.server.protocol import (UNSUPPORTED_CHAT, ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                      ErrorResponse, GenerateRequest, GenerateResponse, TokenizeRequest)
from loraplex.server.state import ServerState

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 503)}


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex  # type: ignore[no-any-return]


def _usage(prompt: int, outs: list[RequestOutput], per_prompt: int = 1) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens: prompt tokens served from the prefix cache. `per_prompt`: how many of
    `outs` share one prompt (n choices of a chat request count their prompt once)."""
    completion = sum(len(o.outputs[0].token_ids) for o in outs)
    cached = sum(o.num_cached_tokens for o in outs) // per_prompt
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _running_usage(on: bool, prompt: int, generated: dict[int, int]) -> dict[str, Any]:
    """stream_options.continuous_usage_stats (vLLM's): the usage so far, on every chunk."""
    if not on:
        return {}
    completion = sum(generated.values())
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def _finish(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _start(st: ServerState, request: Request, prompt: list[int], params: list, adapter: str | None,
                 cache_salt: str | None) -> tuple[Tracker, list]:
    name = st.served_name if adapter is None else st.engine.adapter_spec(adapter).name  # a series per name, not version
    scope = st.auth.scope(request)
    tracker = Tracker(st.metrics, name, prompt_tokens=len(prompt), owner=scope.owner)
    salt = auth.cache_salt(scope, cache_salt)  # each key its own prefix-cache namespace
    try:
        return tracker, await open_streams(st.engine, prompt, params, adapter, tracker, salt)
    except Exception as e:
        status = status_of(e)[0]
        if status == 404:
            tracker.model = "unknown"  # a client's arbitrary model name never becomes a metric label or a dashboard row
        tracker.done(str(status))
        raise


async def _collect(request: Request, firsts: list, tracker: Tracker) -> list[RequestOutput]:
    """Run the choices to the end and record the outcome (499 when the client hung up)."""
    try:
        outs = await collect(request, firsts, tracker)
    except BaseException as e:
        tracker.done(str(status_of(e)[0]) if isinstance(e, Exception) else "499")
        raise
    tracker.done("200")
    return outs


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    st = _state(request)
    scope = st.auth.scope(request)
    adapter = st.resolve_model(body.model, scope)
    for field, why in UNSUPPORTED_CHAT.items():
        if getattr(body, field) is not None:
            raise APIError(400, f"{field} is not supported by this server ({why})", "BadRequestError", field)
    if body.modalities not in (None, ["text"]):
        raise APIError(400, "modalities: only [\"text\"] is supported", "BadRequestError", "modalities")
    tp = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    prompt = await rendered_chat(st.prepare, st.engine.tokenizer, body.messages, tp.tools)
    room = st.engine.max_model_len - len(prompt)
    check_room(len(prompt), body.max_completion_tokens or body.max_tokens, st.engine.max_model_len)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
    sampling = sampling_params(body, max_tokens)
    if tp.constraint is not None:
        if sampling.structured is not None:
            raise APIError(400, "tool_choice required or a named function cannot be combined with response_format "
                           "or structured outputs", "BadRequestError", "tool_choice")
        sampling = replace(sampling, structured=tp.constraint)
    params = choice_params(sampling, body.n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    st.admit(body.n)
    try:
        tracker, firsts = await _start(st, request, prompt, params, adapter, body.cache_salt)
    except BaseException:
        st.leave(body.n)
        raise
    if not body.stream:
        try:
            outs = await _collect(request, firsts, tracker)
        finally:
            st.leave(body.n)
        choices = []
        for i, o in enumerate(outs):
            c = o.outputs[0]
            message, finish = tools.to_message(c.text, _finish(c.finish_reason), tp)
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": None if c.logprobs is None else await logprobs.chat(st.engine.tokenizer,
                                                                                            c.token_ids, c.logprobs)})
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
            "system_fingerprint": fingerprint(firsts, st.served_name),
            "usage": _usage(len(prompt), outs, per_prompt=len(outs)),
        }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = include_usage and bool(body.stream_options and body.stream_options.continuous_usage_stats)

    async def events() -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "system_fingerprint": fingerprint(firsts, st.served_name)}
        finals: list[RequestOutput] = []
        status, completed = "200", False
        lps = logprobs.Stream(st.engine.tokenizer, "chat")
        generated: dict[int, int] = {}
        try:
            for i in range(len(firsts)):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]})
            async for i, out in merged(firsts, tracker):
                c = out.outputs[0]
                lps.add(i, c.delta_token_ids, c.delta_logprobs)
                generated[i] = len(c.token_ids)
                if tp.active:  # tool calls are known once the output is: sent as deltas at its end
                    if out.finished:
                        message, finish = tools.to_message(c.text, _finish(c.finish_reason), tp)
                        for delta in [*tools.stream_deltas(message), {}]:
                            yield _sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                              "finish_reason": None if delta else finish}],
                                        **_running_usage(continuous, len(prompt), generated)})
                        finals.append(out)
                    continue
                if c.delta_text or out.finished:
                    yield _sse({**base, "choices": [{"index": i, "delta": {"content": c.delta_text} if c.delta_text else {},
                                                      "finish_reason": _finish(c.finish_reason),
                                                      "logprobs": await lps.take(i, c.delta_text)}],
                                **_running_usage(continuous, len(prompt), generated)})
                if out.finished:
                    finals.append(out)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(prompt), finals, per_prompt=max(len(finals), 1))})
            yield _sse("[DONE]")
            completed = True
        except Exception as e:  # an error after streaming began: report it in-band, as vLLM does
            code, type_ = status_of(e)
            status = str(code)
            yield _sse(error_body(code, public_message(e), type_))
            yield _sse("[DONE]")
        finally:
            tracker.done(status if completed or status != "200" else "499")  # 499: the client went away
            st.leave(body.n)

    return StreamingResponse(events(), media_type="text/event-stream")


async def _prompts(body: CompletionRequest, st: ServerState) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return await encoded(st.prepare, st.engine.tokenizer, [p])
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if p and all(isinstance(x, str) for x in p):
        return await encoded(st.prepare, st.engine.tokenizer, p)  # type: ignore[arg-type]
    if p and all(isinstance(x, list) for x in p):
        return [list(x) for x in p]  # type: ignore[arg-type]
    raise InvalidRequestError("prompt must be a string, a list of strings, a list of token ids, or a list of those")


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = _state(request)
    scope = st.auth.scope(request)
    adapter = st.resolve_model(body.model, scope)
    if body.suffix or (body.best_of not in (None, 1, body.n)):
        raise APIError(400, "suffix and best_of are not supported by this server", "BadRequestError")
    tok = st.engine.tokenizer
    prompts = await _prompts(body, st)
    if len(prompts) > 64:
        raise InvalidRequestError(f"at most 64 prompts per request, got {len(prompts)}")
    for p in prompts:
        check_room(len(p), body.max_tokens, st.engine.max_model_len)
    sampling = sampling_params(body, body.max_tokens or 16)
    if body.echo and sampling.logprobs is not None:  # echo with logprobs: the prompt's tokens are scored too
        sampling = replace(sampling, prompt_logprobs=sampling.logprobs)
    params = choice_params(sampling, body.n)
    echoes = await decoded(st.prepare, tok, prompts) if body.echo else [""] * len(prompts)

    async def echoed(p_index: int, out: RequestOutput) -> tuple[str, dict[str, Any] | None]:
        """The prompt's text and, with logprobs, its tokens' log-probabilities: the start of an echoed choice."""
        if not body.echo:
            return "", None
        part = None
        if out.prompt_logprobs is not None:
            part = await logprobs.prompt_part(tok, out.prompt_token_ids, out.prompt_logprobs)
        return echoes[p_index], part
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    n_total = len(prompts) * body.n
    st.admit(n_total)
    started: list[tuple[Tracker, list]] = []
    try:
        for prompt in prompts:
            started.append(await _start(st, request, prompt, params, adapter, body.cache_salt))
            adapter = pinned_version(started[0][1][0][1], adapter)  # every prompt on the first one's version
    except BaseException:
        for tracker, firsts in started:
            for _, s in firsts:
                s.abort()
        st.leave(n_total)
        raise
    if not body.stream:
        try:
            choices, outs_all = [], []
            for p_index, (tracker, firsts) in enumerate(started):
                outs = await _collect(request, firsts, tracker)
                outs_all.extend(outs)
                for i, o in enumerate(outs):
                    c = o.outputs[0]
                    head, head_lps = await echoed(p_index, o)
                    lps = None if c.logprobs is None else await logprobs.completion(tok, c.token_ids, c.logprobs,
                                                                                    len(head))
                    choices.append({"index": p_index * body.n + i, "text": head + c.text,
                                    "logprobs": logprobs.joined(head_lps, lps),
                                    "finish_reason": _finish(c.finish_reason)})
        finally:
            for _, firsts in started:  # after an error or a hang-up, the other prompts' requests stop too
                for _, stream in firsts:
                    stream.abort()
            st.leave(n_total)
        prompt_tokens = sum(len(p) for p in prompts) * body.n
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": fingerprint(started[0][1], st.served_name),
                "choices": choices, "usage": _usage(prompt_tokens, outs_all)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = include_usage and bool(body.stream_options and body.stream_options.continuous_usage_stats)

    async def events() -> AsyncIterator[str]:
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": fingerprint(started[0][1], st.served_name)}
        finals: list[RequestOutput] = []
        done_trackers = 0
        lps = logprobs.Stream(st.engine.tokenizer, "completion")
        generated: dict[int, int] = {}
        started_choices: set[int] = set()
        try:
            for p_index, (tracker, firsts) in enumerate(started):
                async for i, out in merged(firsts, tracker):
                    c = out.outputs[0]
                    index = p_index * body.n + i
                    head, head_lps = await echoed(p_index, out) if index not in started_choices else ("", None)
                    if head:
                        started_choices.add(index)
                        lps.offsets[index] = len(head)
                    lps.add(index, c.delta_token_ids, c.delta_logprobs)
                    generated[index] = len(c.token_ids)
                    if head or c.delta_text or out.finished:
                        yield _sse({**base, "choices": [{"index": index, "text": head + c.delta_text,
                                                          "logprobs": logprobs.joined(
                                                              head_lps, await lps.take(index, c.delta_text)),
                                                          "finish_reason": _finish(c.finish_reason)}],
                                    **_running_usage(continuous, sum(len(p) for p in prompts) * body.n, generated)})
                    if out.finished:
                        finals.append(out)
                tracker.done("200")
                done_trackers += 1
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(sum(len(p) for p in prompts) * body.n, finals)})
            yield _sse("[DONE]")
        except Exception as e:
            code, type_ = status_of(e)
            yield _sse(error_body(code, public_message(e), type_))
            yield _sse("[DONE]")
            for tracker, _ in started[done_trackers:]:
                tracker.done(str(code))
            done_trackers = len(started)
        finally:
            for tracker, _ in started[done_trackers:]:
                tracker.done("499")  # the client went away
            st.leave(n_total)

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> Any:
    """The simple tenant endpoint: {"tenant_id", "prompt", ...sampling} -> {"response"}."""
    st = _state(request)
    scope = st.auth.scope(request)
    model = body.tenant_id or st.served_name
    adapter = st.resolve_model(model, scope)
    tok = st.engine.tokenizer
    prompt = (await rendered_chat(st.prepare, tok, [ChatMessage(role="user", content=body.prompt)]) if body.chat
              else (await encoded(st.prepare, tok, [body.prompt]))[0])
    params = sampling_params(body, body.max_tokens or 128, default_temperature=0.0)
    st.admit()
    try:
        tracker, firsts = await _start(st, request, prompt, [params], adapter, body.cache_salt)
        outs = await _collect(request, firsts, tracker)
    finally:
        st.leave()
    c = outs[0].outputs[0]
    return JSONResponse({"response": c.text, "tenant_id": body.tenant_id, "finish_reason": _finish(c.finish_reason),
                         "usage": _usage(len(prompt), outs)})


@router.post("/tokenize", responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """vLLM's: the token ids of a prompt (or of chat messages through the chat template), and the context length."""
    st = _state(request)
    scope = st.auth.scope(request)  # with keys, a key is needed even without a model
    if body.model is not None:
        st.resolve_model(body.model, scope)  # the key must be allowed the model it names
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages")
    tok = st.engine.tokenizer
    if body.messages is not None:
        tokens = await rendered_chat(st.prepare, tok, body.messages)
    else:
        tokens = (await encoded(st.prepare, tok, [body.prompt], body.add_special_tokens))[0]
    return {"count": len(tokens), "max_model_len": st.engine.max_model_len, "tokens": tokens}


@router.post("/detokenize", responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, str]:
    st = _state(request)
    scope = st.auth.scope(request)
    if body.model is not None:
        st.resolve_model(body.model, scope)
    vocab = len(st.engine.tokenizer)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise InvalidRequestError(f"tokens must be in [0, {vocab})")
    return {"prompt": (await decoded(st.prepare, st.engine.tokenizer, [body.tokens]))[0]}
