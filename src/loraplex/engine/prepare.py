"""Request preparation off the engine thread and the event loop: what preparing does (Preparer: validation,
tokenization, bad_words ids, the grammar matcher), the PreparedRequest it hands to the engine thread, which only
admits ready requests, and a small bounded pool of worker threads that runs this client-controlled CPU work (and
the server's chat templating) under a time cap.

Why threads help: tokenizers and llguidance do this work in Rust and drop the GIL meanwhile (the fast tokenizer's
encode, LLMatcher's constructor), so streams, /health and decoding go on (benchmarks/prepare_isolation.py measures
a stream's gaps meanwhile). Why bounded: a flood of expensive schemas queues here instead of taking every core from the
forward pass. Why the cap counts from the moment a worker starts the job, not from submission: a request waiting
behind another tenant's schema is not at fault (its wait is bounded by the server's admission queue, and a client
that goes away cancels a job not yet started). A running job cannot be interrupted: past the cap its caller gets
PrepareTimeoutError (HTTP 400) at once and what the worker produces later is dropped; llguidance's own limits
(engine/structured.py) bound how long that can be.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from loraplex.adapters.key import AdapterTarget
from loraplex.errors import EngineUnavailableError, InvalidRequestError, PromptTooLongError
from loraplex.sampling import SamplingParams

if TYPE_CHECKING:
    from loraplex.engine.structured import StructuredOutputs

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_PREPARE_SECONDS = 5.0
# Half the cores, at most 4: the rest stay with the forward pass however many schemas arrive at once.
DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))


class PrepareTimeoutError(InvalidRequestError):
    """Preparing a request (templating, tokenizing, compiling its grammar) took longer than --max-prepare-seconds."""


class Stage:
    """What a prepare job is doing now, as the subject of the error sent when the cap passes
    ("compiling the structured output's json_schema"). The job sets it; the waiting coroutine reads it."""

    def __init__(self, doing: str) -> None:
        self.doing = doing


@dataclass(slots=True)
class PreparedRequest:
    """A request validated and tokenized, with its bad_words ids and grammar matcher made (LLMEngine.prepare):
    what LLMEngine.admit queues. The adapter version is resolved at admission, not here."""

    prompt: str | None  # the prompt's text, when it was given as text
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterTarget  # a spec or a sibling's key, resolved at admission; None: the base model
    cache_salt: str | None
    bad_words_ids: list[list[int]]
    matcher: Any  # llguidance.LLMatcher when sampling.structured is set, else None


class Preparer:
    """The part of adding a request that depends on the request alone (LLMEngine.add_request = prepare + admit).
    It touches no engine state, so it runs on any thread while another steps."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, structured: StructuredOutputs) -> None:
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.structured = structured

    def prepare(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                adapter: AdapterTarget = None, cache_salt: str | None = None,
                stage: Stage | None = None) -> PreparedRequest:
        """Validate and tokenize the request, make its bad_words ids and grammar matcher (compiled once per schema);
        `stage` is kept saying which part runs (for PreparePool's time-cap error)."""
        stage = stage or Stage("preparing the request")
        sampling = sampling or SamplingParams()
        stage.doing = "tokenizing the prompt"
        text, token_ids = self.tokens(prompt)
        vocab = self.vocab_size
        for name, ids in (("stop_token_ids", sampling.stop_token_ids), ("logit_bias", list(sampling.logit_bias)),
                          ("allowed_token_ids", sampling.allowed_token_ids or [])):
            if any(t >= vocab for t in ids):
                raise InvalidRequestError(f"{name}: token ids must be in [0, {vocab})")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError("cache_salt must be a non-empty string")
        stage.doing = "tokenizing bad_words"
        bad_words_ids = self.bad_words(sampling.bad_words)
        matcher = None
        if sampling.structured is not None:
            stage.doing = f"compiling the structured output's {sampling.structured.kind}"
            matcher = self.structured.matcher(sampling.structured)
        return PreparedRequest(text, token_ids, sampling, adapter, cache_salt, bad_words_ids, matcher)

    @staticmethod
    def needs_work(sampling: SamplingParams | None) -> bool:
        """Whether preparing a token-id prompt would run the tokenizer (bad_words) or the grammar compiler (else it
        is a bounded id check)."""
        return sampling is not None and bool(sampling.bad_words or sampling.structured)

    def tokens(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """The prompt's text (None when given as ids) and its token ids, checked against the context and vocab."""
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = list(self.tokenizer.encode(prompt))
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:  # first: the id scan below then costs at most max_model_len
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens; the context (max_model_len) is {self.max_model_len} tokens, "
                "which must also leave room for at least one generated token"
            )
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        return text, token_ids

    def bad_words(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token sequences, alone and after a space (as vLLM tokenizes them)."""
        seqs: list[list[int]] = []
        for w in words:
            for text in (w, " " + w.lstrip()):
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs


class PreparePool:
    """`workers` threads running prepare jobs, each given `max_seconds` once it starts."""

    def __init__(self, max_seconds: float = DEFAULT_MAX_PREPARE_SECONDS, workers: int = DEFAULT_WORKERS,
                 name: str = "loraplex-prepare") -> None:
        if max_seconds <= 0:
            raise InvalidRequestError(f"max_prepare_seconds must be > 0, got {max_seconds}")
        self.max_seconds = max_seconds
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.late = 0  # jobs that ran past the cap; their results were dropped

    async def run(self, stage: Stage, fn: Callable[..., T], *args: Any, warm: Callable[[], Any] | None = None) -> T:
        """fn(*args) on a worker; its result or exception comes back here. `warm`: a one-time set-up (the grammar
        engine's tokenizer) run first, outside the cap, since no request causes it. Past the cap (counted from the
        start of fn): PrepareTimeoutError naming `stage.doing` and the flag."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def job() -> T:
            if warm is not None:
                warm()
            try:
                loop.call_soon_threadsafe(started.set)
            except RuntimeError:  # the caller's loop is gone: nobody waits for this result
                pass
            return fn(*args)

        try:
            fut = self._pool.submit(job)
        except RuntimeError:  # shut down: the server or engine is stopping
            raise EngineUnavailableError("the server is shutting down; retry on another replica or later") from None
        done = asyncio.wrap_future(fut)
        waiting = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({waiting, done}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                await asyncio.wait_for(asyncio.shield(done), self.max_seconds)
            return done.result()
        except TimeoutError:
            self.late += 1
            done.add_done_callback(_drop)
            log.warning("%s ran past --max-prepare-seconds %g; its result will be dropped", stage.doing,
                        self.max_seconds)
            raise PrepareTimeoutError(
                f"{stage.doing} took more than {self.max_seconds:g} s (--max-prepare-seconds {self.max_seconds:g}); "
                "send a smaller or simpler request, or ask the operator to raise --max-prepare-seconds") from None
        except BaseException:
            fut.cancel()  # a client gone before its job started: the job never runs
            raise
        finally:
            waiting.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _drop(fut: asyncio.Future[Any]) -> None:
    """Consume the late result or error of a job whose caller already got its 400."""
    if not fut.cancelled():
        fut.exception()
