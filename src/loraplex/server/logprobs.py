"""Log-probabilities in OpenAI's response shapes: chat's `logprobs.content` list and completions' parallel lists.

Each token is shown as its own decoded text (a token that ends inside a multi-byte character decodes to U+FFFD,
its `bytes` then hold the replacement character's, as vLLM's do).

Rendering decodes every token and each of its top alternatives (up to 21 decodes a token), so the async functions
here run it on a worker thread (asyncio.to_thread; the work is bounded by the tokens generated): the event loop
only awaits it, and other streams and /health go on meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any

from loraplex.sampling import TokenLogprobs


def _text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


async def chat(tokenizer: Any, token_ids: list[int], logprobs: list[TokenLogprobs]) -> dict[str, Any]:
    """Chat's `logprobs` of these tokens, rendered off the event loop (_chat)."""
    return await asyncio.to_thread(_chat, tokenizer, token_ids, logprobs)


async def completion(tokenizer: Any, token_ids: list[int], logprobs: list[TokenLogprobs],
                     offset: int = 0) -> dict[str, Any]:
    """Completions' `logprobs` of these tokens, rendered off the event loop (_completion)."""
    return await asyncio.to_thread(_completion, tokenizer, token_ids, logprobs, offset)


async def prompt_part(tokenizer: Any, prompt_ids: list[int],
                      prompt_logprobs: list[TokenLogprobs | None]) -> dict[str, Any]:
    """The echoed prompt's `logprobs`, rendered off the event loop (_prompt_part)."""
    return await asyncio.to_thread(_prompt_part, tokenizer, prompt_ids, prompt_logprobs)


def _chat(tokenizer: Any, token_ids: list[int], logprobs: list[TokenLogprobs]) -> dict[str, Any]:
    """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]} for these tokens."""
    content = []
    for t, lp in zip(token_ids, logprobs):
        text = _text(tokenizer, t)
        top = []
        for tid, v in lp.top:
            tt = _text(tokenizer, tid)
            top.append({"token": tt, "logprob": v, "bytes": list(tt.encode())})
        content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}


def _completion(tokenizer: Any, token_ids: list[int], logprobs: list[TokenLogprobs], offset: int = 0) -> dict[str, Any]:
    """{"tokens", "token_logprobs", "top_logprobs" ({token: logprob}), "text_offset"}; offsets count from `offset`,
    the characters of the choice's text before these tokens."""
    tokens, values, tops, offsets = [], [], [], []
    for t, lp in zip(token_ids, logprobs):
        text = _text(tokenizer, t)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_text(tokenizer, tid): v for tid, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class Stream:
    """Streaming: each choice's tokens and log-probabilities not sent yet. An output whose text the detokenizer
    holds back sends nothing; its tokens go out with the next chunk of that choice."""

    def __init__(self, tokenizer: Any, shape: str) -> None:
        self.tokenizer = tokenizer
        self.shape = shape  # "chat" or "completion"
        self.pending: dict[int, tuple[list[int], list[TokenLogprobs]]] = {}
        self.offsets: dict[int, int] = {}  # completion: characters sent so far per choice

    def add(self, choice: int, token_ids: list[int], logprobs: list[TokenLogprobs] | None) -> None:
        if logprobs is None:
            return
        ids, lps = self.pending.setdefault(choice, ([], []))
        ids += token_ids
        lps += logprobs

    async def take(self, choice: int, text: str) -> dict[str, Any] | None:
        """The `logprobs` of the chunk that sends `text` for `choice` (None when the request did not ask),
        rendered off the event loop."""
        if choice not in self.pending:
            return None
        ids, lps = self.pending.pop(choice)
        self.pending[choice] = ([], [])
        if self.shape == "chat":
            return await chat(self.tokenizer, ids, lps)
        offset = self.offsets.get(choice, 0)
        self.offsets[choice] = offset + len(text)
        return await completion(self.tokenizer, ids, lps, offset)


def _prompt_part(tokenizer: Any, prompt_ids: list[int], prompt_logprobs: list[TokenLogprobs | None]) -> dict[str, Any]:
    """Completions with echo: the prompt's tokens in the four lists (the first token has no log-probability)."""
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for t, lp in zip(prompt_ids, prompt_logprobs):
        text = _text(tokenizer, t)
        tokens.append(text)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {_text(tokenizer, tid): v for tid, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def joined(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two completion-shaped parts, one after the other."""
    if first is None or second is None:
        return first or second
    return {k: first[k] + second[k] for k in first}
