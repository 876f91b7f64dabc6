"""POST /v1/chat/completions, /v1/completions and /generate: non-streaming and SSE streaming."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.engine.outputs import RequestOutput
from loraplex.errors import InvalidRequestError
from loraplex.server.errors import APIError
from loraplex.server import beams, logprobs, tools
from loraplex.server.generation import check_room, choice_params, decoded, encoded, rendered_chat, sampling_params
from loraplex.server.request_job import RequestJob
from loraplex.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
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


def _running_usage(on: bool, prompt: int, generated: dict[tuple[int, int], int]) -> dict[str, Any]:
    """stream_options.continuous_usage_stats (vLLM's): the usage so far, on every chunk."""
    if not on:
        return {}
    completion = sum(generated.values())
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def _usage_options(body: ChatCompletionRequest | CompletionRequest) -> tuple[bool, bool]:
    """stream_options: include_usage (a last chunk with the usage), continuous_usage_stats (vLLM's: on every chunk)."""
    o = body.stream_options
    include = bool(o and o.include_usage)
    return include, include and bool(o and o.continuous_usage_stats)


def _rid(prefix: str, body: ChatCompletionRequest | CompletionRequest) -> str:
    """The response's id: from vLLM's `request_id` when the body gives one, as vLLM builds it."""
    return f"{prefix}-{body.request_id or uuid.uuid4().hex}"


def _head(rid: str, kind: str, created: int, model: str, fingerprint: str) -> dict[str, Any]:
    """The fields every response and chunk of a request carries (the fingerprint: RequestJob.fingerprint)."""
    return {"id": rid, "object": kind, "created": created, "model": model, "system_fingerprint": fingerprint}


async def _beams(st: ServerState, job: RequestJob, prompts: list[list[int]], body: ChatCompletionRequest |
                 CompletionRequest, max_tokens: int) -> tuple[list[tuple[int, str, str]], dict[str, Any], str]:
    """vLLM's beam search (server/beams.py) for each prompt: its n beams as (prompt index, text, finish reason),
    best first, the usage, and the fingerprint."""
    found = await beams.run(job, prompts, body.n, max_tokens, body)
    flat = [(p, b) for p, bs in enumerate(found.beams) for b in bs]
    texts = await decoded(st.prepare, st.engine.tokenizer, [b.generated for _, b in flat])
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(b.tokens) - b.prompt_len for _, b in flat)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
             "total_tokens": prompt_tokens + completion}
    fingerprint = st.served_name if found.adapter is None else str(found.adapter)
    return [(p, t, "stop" if b.ended else "length") for (p, b), t in zip(flat, texts)], usage, fingerprint


def _finish(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    st = _state(request)
    scope = st.auth.scope(request)
    adapter = st.resolve_model(body.model, scope)
    tp = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    prompt = await rendered_chat(st.prepare, st.engine.tokenizer, body.messages, tp.tools)
    room = st.engine.facts.max_model_len - len(prompt)
    check_room(len(prompt), body.max_completion_tokens or body.max_tokens, st.engine.facts.max_model_len)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
    if body.use_beam_search:
        beams.check(body, body.n)
        rid, created = _rid("chatcmpl", body), int(time.time())
        job = RequestJob(st, request, scope, adapter, body.cache_salt, body.priority)
        found, usage, fp = await _beams(st, job, [prompt], body, max_tokens)
        return {**_head(rid, "chat.completion", created, body.model, fp), "usage": usage,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": None} for i, (_, text, finish) in enumerate(found)]}
    sampling = sampling_params(body, max_tokens)
    if tp.constraint is not None:
        if sampling.structured is not None:
            raise APIError(400, "tool_choice required or a named function cannot be combined with response_format "
                           "or structured outputs", "invalid_value", "tool_choice")
        sampling = replace(sampling, structured=tp.constraint)
    params = choice_params(sampling, body.n)
    rid, created = _rid("chatcmpl", body), int(time.time())
    job = RequestJob(st, request, scope, adapter, body.cache_salt, body.priority)
    await job.start([prompt], params)
    if not body.stream:
        outs = (await job.collect())[0]
        choices = []
        for i, o in enumerate(outs):
            c = o.outputs[0]
            message, finish = tools.to_message(c.text, _finish(c.finish_reason), tp)
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": None if c.logprobs is None else await logprobs.chat(st.engine.tokenizer,
                                                                                            c.token_ids, c.logprobs)})
        return {**_head(rid, "chat.completion", created, body.model, job.fingerprint), "choices": choices,
                "usage": _usage(len(prompt), outs, per_prompt=len(outs))}
    include_usage, continuous = _usage_options(body)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        base = _head(rid, "chat.completion.chunk", created, body.model, job.fingerprint)
        lps = logprobs.Stream(st.engine.tokenizer, "chat")
        for i in range(len(params)):
            yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]}
        async for _, i, out in job.outputs():
            c = out.outputs[0]
            lps.add(i, c.delta_token_ids, c.delta_logprobs)
            if tp.active:  # tool calls are known once the output is: sent as deltas at its end
                if out.finished:
                    message, finish = tools.to_message(c.text, _finish(c.finish_reason), tp)
                    for delta in [*tools.stream_deltas(message), {}]:
                        yield {**base, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                    "finish_reason": None if delta else finish}],
                               **_running_usage(continuous, len(prompt), job.generated)}
                continue
            if c.delta_text or out.finished:
                yield {**base, "choices": [{"index": i, "delta": {"content": c.delta_text} if c.delta_text else {},
                                            "finish_reason": _finish(c.finish_reason),
                                            "logprobs": await lps.take(i, c.delta_text)}],
                       **_running_usage(continuous, len(prompt), job.generated)}
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(len(prompt), job.finals, per_prompt=max(len(job.finals), 1))}

    return StreamingResponse(job.stream(chunks()), media_type="text/event-stream")

async def _prompts(body: CompletionRequest, st: ServerState) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return await encoded(st.prepare, st.engine.tokenizer, [p], body.add_special_tokens)
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if p and all(isinstance(x, str) for x in p):
        return await encoded(st.prepare, st.engine.tokenizer, p, body.add_special_tokens)  # type: ignore[arg-type]
    if p and all(isinstance(x, list) for x in p):
        return [list(x) for x in p]  # type: ignore[arg-type]
    raise InvalidRequestError("prompt must be a string, a list of strings, a list of token ids, or a list of those")


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = _state(request)
    scope = st.auth.scope(request)
    adapter = st.resolve_model(body.model, scope)
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, f"best_of {body.best_of} is not supported by this server: best_of must be n (or 1), as "
                       "each choice is returned", "unsupported_value", "best_of")
    tok = st.engine.tokenizer
    prompts = await _prompts(body, st)
    if len(prompts) > 64:
        raise InvalidRequestError(f"at most 64 prompts per request, got {len(prompts)}")
    for p in prompts:
        check_room(len(p), body.max_tokens, st.engine.facts.max_model_len)
    if body.use_beam_search:
        beams.check(body, body.n)
        rid, created = _rid("cmpl", body), int(time.time())
        job = RequestJob(st, request, scope, adapter, body.cache_salt, body.priority)
        found, usage, fp = await _beams(st, job, prompts, body, body.max_tokens or 16)
        return {**_head(rid, "text_completion", created, body.model, fp), "usage": usage,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                            for i, (_, text, finish) in enumerate(found)]}
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
    rid, created = _rid("cmpl", body), int(time.time())
    prompt_tokens = sum(len(p) for p in prompts) * body.n
    job = RequestJob(st, request, scope, adapter, body.cache_salt, body.priority)
    await job.start(prompts, params)
    if not body.stream:
        choices, outs_all = [], []
        for p_index, outs in enumerate(await job.collect()):
            outs_all.extend(outs)
            for i, o in enumerate(outs):
                c = o.outputs[0]
                head, head_lps = await echoed(p_index, o)
                lps = None if c.logprobs is None else await logprobs.completion(tok, c.token_ids, c.logprobs, len(head))
                choices.append({"index": p_index * body.n + i, "text": head + c.text,
                                "logprobs": logprobs.joined(head_lps, lps), "finish_reason": _finish(c.finish_reason)})
        return {**_head(rid, "text_completion", created, body.model, job.fingerprint), "choices": choices,
                "usage": _usage(prompt_tokens, outs_all)}
    include_usage, continuous = _usage_options(body)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        base, lps = _head(rid, "text_completion", created, body.model, job.fingerprint), logprobs.Stream(tok, "completion")
        started_choices: set[int] = set()
        async for p_index, i, out in job.outputs():
            c = out.outputs[0]
            index = p_index * body.n + i
            head, head_lps = await echoed(p_index, out) if index not in started_choices else ("", None)
            if head:
                started_choices.add(index)
                lps.offsets[index] = len(head)
            lps.add(index, c.delta_token_ids, c.delta_logprobs)
            if head or c.delta_text or out.finished:
                yield {**base, "choices": [{"index": index, "text": head + c.delta_text,
                                            "logprobs": logprobs.joined(head_lps, await lps.take(index, c.delta_text)),
                                            "finish_reason": _finish(c.finish_reason)}],
                       **_running_usage(continuous, prompt_tokens, job.generated)}
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(prompt_tokens, job.finals)}

    return StreamingResponse(job.stream(chunks()), media_type="text/event-stream")

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
    job = RequestJob(st, request, scope, adapter, body.cache_salt, body.priority)
    await job.start([prompt], [params])
    outs = (await job.collect())[0]
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
    return {"count": len(tokens), "max_model_len": st.engine.facts.max_model_len, "tokens": tokens}


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
