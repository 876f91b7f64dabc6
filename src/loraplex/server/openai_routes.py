"""POST /v1/chat/completions, /v1/completions and /generate: non-streaming and SSE streaming."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.engine.outputs import RequestOutput
from loraplex.errors import InvalidRequestError
from loraplex.server.errors import APIError, error_body, status_of
from loraplex.server.generation import Tracker, choice_params, collect, merged, open_streams, render_chat, sampling_params
from loraplex.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ErrorResponse, GenerateRequest, GenerateResponse
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)
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


def _finish(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _start(st: ServerState, request: Request, prompt: list[int], params: list, adapter: str | None,
                 label: str, cache_salt: str | None) -> tuple[Tracker, list]:
    tracker = Tracker(st.metrics, label, prompt_tokens=len(prompt))
    try:
        return tracker, await open_streams(st.engine, prompt, params, adapter, tracker, cache_salt)
    except Exception as e:
        status = status_of(e)[0]
        if status == 404:
            tracker.model = "unknown"  # a client's arbitrary model name never becomes a metric label
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
    if body.tools or body.response_format not in (None, {"type": "text"}):
        raise APIError(400, "tools and response_format are not supported by this server", "BadRequestError")
    prompt = render_chat(st.engine.tokenizer, body.messages)
    room = st.engine.max_model_len - len(prompt)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
    params = choice_params(sampling_params(body, max_tokens), body.n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    st.admit(body.n)
    try:
        tracker, firsts = await _start(st, request, prompt, params, adapter, body.model, body.cache_salt)
    except BaseException:
        st.leave(body.n)
        raise
    if not body.stream:
        try:
            outs = await _collect(request, firsts, tracker)
        finally:
            st.leave(body.n)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": o.outputs[0].text},
                         "finish_reason": _finish(o.outputs[0].finish_reason), "logprobs": None}
                        for i, o in enumerate(outs)],
            "usage": _usage(len(prompt), outs, per_prompt=len(outs)),
        }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        finals: list[RequestOutput] = []
        status, completed = "200", False
        try:
            for i in range(len(firsts)):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]})
            async for i, out in merged(firsts, tracker):
                c = out.outputs[0]
                if c.delta_text or out.finished:
                    yield _sse({**base, "choices": [{"index": i, "delta": {"content": c.delta_text} if c.delta_text else {},
                                                      "finish_reason": _finish(c.finish_reason), "logprobs": None}]})
                if out.finished:
                    finals.append(out)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(prompt), finals, per_prompt=max(len(finals), 1))})
            yield _sse("[DONE]")
            completed = True
        except Exception as e:  # an error after streaming began: report it in-band, as vLLM does
            code, type_ = status_of(e)
            status = str(code)
            if code >= 500:
                log.exception("stream failed", exc_info=e)
            yield _sse(error_body(code, str(e) if code < 500 else "internal server error", type_))
            yield _sse("[DONE]")
        finally:
            tracker.done(status if completed or status != "200" else "499")  # 499: the client went away
            st.leave(body.n)

    return StreamingResponse(events(), media_type="text/event-stream")


def _prompts(body: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [list(tokenizer.encode(p))]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if p and all(isinstance(x, str) for x in p):
        return [list(tokenizer.encode(x)) for x in p]  # type: ignore[arg-type]
    if p and all(isinstance(x, list) for x in p):
        return [list(x) for x in p]  # type: ignore[arg-type]
    raise InvalidRequestError("prompt must be a string, a list of strings, a list of token ids, or a list of those")


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = _state(request)
    scope = st.auth.scope(request)
    adapter = st.resolve_model(body.model, scope)
    if body.suffix or body.echo or (body.best_of not in (None, 1, body.n)):
        raise APIError(400, "suffix, echo and best_of are not supported by this server", "BadRequestError")
    prompts = _prompts(body, st.engine.tokenizer)
    if len(prompts) > 64:
        raise InvalidRequestError(f"at most 64 prompts per request, got {len(prompts)}")
    params = choice_params(sampling_params(body, body.max_tokens or 16), body.n)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    n_total = len(prompts) * body.n
    st.admit(n_total)
    started: list[tuple[Tracker, list]] = []
    try:
        for prompt in prompts:
            started.append(await _start(st, request, prompt, params, adapter, body.model, body.cache_salt))
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
                choices += [{"index": p_index * body.n + i, "text": o.outputs[0].text, "logprobs": None,
                             "finish_reason": _finish(o.outputs[0].finish_reason)} for i, o in enumerate(outs)]
        finally:
            for _, firsts in started:  # after an error or a hang-up, the other prompts' requests stop too
                for _, stream in firsts:
                    stream.abort()
            st.leave(n_total)
        prompt_tokens = sum(len(p) for p in prompts) * body.n
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": _usage(prompt_tokens, outs_all)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        finals: list[RequestOutput] = []
        done_trackers = 0
        try:
            for p_index, (tracker, firsts) in enumerate(started):
                async for i, out in merged(firsts, tracker):
                    c = out.outputs[0]
                    if c.delta_text or out.finished:
                        yield _sse({**base, "choices": [{"index": p_index * body.n + i, "text": c.delta_text,
                                                          "logprobs": None, "finish_reason": _finish(c.finish_reason)}]})
                    if out.finished:
                        finals.append(out)
                tracker.done("200")
                done_trackers += 1
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(sum(len(p) for p in prompts) * body.n, finals)})
            yield _sse("[DONE]")
        except Exception as e:
            code, type_ = status_of(e)
            if code >= 500:
                log.exception("stream failed", exc_info=e)
            yield _sse(error_body(code, str(e) if code < 500 else "internal server error", type_))
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
    prompt = render_chat(tok, [ChatMessage(role="user", content=body.prompt)]) if body.chat else list(tok.encode(body.prompt))
    params = sampling_params(body, body.max_tokens or 128, default_temperature=0.0)
    st.admit()
    try:
        tracker, firsts = await _start(st, request, prompt, [params], adapter, model, body.cache_salt)
        outs = await _collect(request, firsts, tracker)
    finally:
        st.leave()
    c = outs[0].outputs[0]
    return JSONResponse({"response": c.text, "tenant_id": body.tenant_id, "finish_reason": _finish(c.finish_reason),
                         "usage": _usage(len(prompt), outs)})
