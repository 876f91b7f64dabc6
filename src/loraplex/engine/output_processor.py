"""A sampled token into its request, and the request's RequestOutput out: append the token (and its logprobs),
detokenize the new text, decide whether the request ends and why (a stop token, EOS, a stop string, max_tokens,
the context), and hand out what is new since the last output (the streaming deltas). No torch."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from loraplex.engine import detokenizer
from loraplex.engine.outputs import CompletionOutput, RequestOutput
from loraplex.engine.request import Request
from loraplex.sampling import TokenLogprobs


def append_token(req: Request, token: int, logprobs: TokenLogprobs | None, tokenizer: Any,
                 eos_ids: Collection[int], max_model_len: int) -> str | None:
    """Add one sampled token to `req`; returns why the request ends ("stop", "length") or None if it goes on.
    The caller finishes the request (its KV blocks, slot and adapter reference are the engine's)."""
    req.output_token_ids.append(token)
    if logprobs is not None:
        req.output_logprobs.append(logprobs)
    sp = req.sampling
    if token in sp.stop_token_ids:
        req.stop_reason = token  # stop tokens end the text, they are not part of it
        return "stop"
    if (not sp.ignore_eos or req.matcher is not None) and token in eos_ids:
        return "stop"  # a grammar that is complete allows only EOS: its output ends there, whatever ignore_eos
    before = len(req.output_text)
    detokenizer.append_text(tokenizer, req)
    if detokenizer.find_stop(req, len(req.output_text) - before):
        return "stop"
    if len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= max_model_len:
        return "length"
    return None


def request_output(req: Request) -> RequestOutput:
    """The request as the caller sees it now: all text and tokens so far, plus what is new since its last output."""
    delta_ids = req.output_token_ids[req.emitted_token_len :]
    req.emitted_token_len = len(req.output_token_ids)
    logprobs = req.sampling.logprobs is not None
    completion = CompletionOutput(
        index=0,
        text=req.output_text,
        token_ids=list(req.output_token_ids),
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
        delta_text=detokenizer.take_delta(req),
        delta_token_ids=delta_ids,
        logprobs=list(req.output_logprobs) if logprobs else None,
        delta_logprobs=req.output_logprobs[len(req.output_token_ids) - len(delta_ids):] if logprobs else None,
    )
    prompt_lps = None
    if req.sampling.prompt_logprobs is not None and len(req.prompt_logprobs) == len(req.prompt_token_ids) - 1:
        prompt_lps = [None, *req.prompt_logprobs]
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.adapter, [completion], req.finished,
                         num_cached_tokens=req.num_cached_tokens, prompt_logprobs=prompt_lps)
