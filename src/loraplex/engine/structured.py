"""Structured outputs: JSON schema, any JSON object, regex, a choice of strings, a Lark or GBNF grammar, through
llguidance (guidance-ai's grammar engine, also vLLM's and SGLang's).

Why llguidance: it computes a request's token mask lazily from the grammar and the tokenizer's token trie, in
tens of microseconds a token, with no per-schema precompilation over the vocabulary and no torch dependency;
its JSON compiler follows JSON Schema closely and lets us fix the whitespace (`whitespace_flexible: false`: one
space after ',' and ':', no newlines), so a small model cannot pad an object with newlines until it runs out of
tokens. A grammar is compiled once per spec into a matcher at its start (an LRU bounded in count and size); each
request gets a deep copy of it (microseconds), so a popular schema is never compiled again. Compiling runs where
the request is prepared (engine/prepare.py: a worker thread, never the engine thread; llguidance drops the GIL
while it builds a matcher) under llguidance's limits (_limits), which bound the work a schema can cause: past
max_grammar_size it is refused ("schema too large"), which bounds how long one schema can hold a prepare worker
(benchmarks/structured.py times schema compiles and the tokenizer's set-up). Each step, the masks of the step's
constrained rows are computed on a worker thread while the forward pass runs, then applied to those rows' logits;
unconstrained rows are never touched.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from loraplex.errors import InvalidRequestError
from loraplex.sampling import StructuredOutput

_CACHE_GRAMMARS, _CACHE_CHARS = 64, 4_000_000  # compiled-matcher LRU: at most ~180 MiB of lexers
# Compact, bounded JSON: a single space after separators, nowhere else.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputs:
    """Grammars (cached) and per-request matchers for one tokenizer and vocabulary."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = eos_ids
        self._tokenizer: Any = None  # llguidance.LLTokenizer, built on first use (it takes the whole vocabulary in)
        self._executor: Any = None
        # (kind, value) -> (grammar text, a matcher at its start that requests copy). A compiled matcher holds its
        # lexer: ~45 bytes per character of grammar text (18 MiB for benchmarks/prepare_isolation.py's
        # schema), so the LRU is bounded by grammar characters too, or tenants' schemas could fill the memory.
        self._compiled: OrderedDict[tuple[str, str], tuple[str, Any]] = OrderedDict()
        self._compiled_chars = 0
        self._lock = threading.Lock()  # the cache, and copying a cached matcher
        self._warm_lock = threading.Lock()  # two workers' first constrained requests build the tokenizer once
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loraplex-grammar")
        self.compile_seconds: list[float] = []  # per grammar compiled (benchmarks)

    def warm(self) -> None:
        """Build llguidance's tokenizer and pay its first mask's set-up now (once; later calls return at once)."""
        self._ll()

    def _ll(self) -> Any:
        if self._tokenizer is not None:
            return self._tokenizer
        with self._warm_lock:
            if self._tokenizer is None:
                self._build_tokenizer()
        return self._tokenizer

    def _build_tokenizer(self) -> None:
        import llguidance
        import llguidance.hf
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos[0])
        self._executor = llguidance.LLExecutor()
        # The first mask pays a one-time set-up (benchmarks/structured.py times it with the tokenizer's): pay it now,
        # while the first constrained request is prepared (outside its time cap: PreparePool's `warm`), not inside a
        # decode step that other requests share.
        warm = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}),
                                    log_level=0)
        fill_next_token_bitmask_par(self._executor, [(warm, 0)], allocate_token_bitmask(1, self.vocab_size))
        self._tokenizer = tokenizer

    def grammar(self, spec: StructuredOutput) -> str:
        """The llguidance grammar of a spec, compiled and validated once; InvalidRequestError names the problem."""
        return self._compile(spec)[0]

    def matcher(self, spec: StructuredOutput) -> Any:
        """A fresh matcher (llguidance.LLMatcher) at the start of the grammar, for one request: a copy of the one
        compiled for this spec."""
        compiled = self._compile(spec)[1]
        with self._lock:
            return compiled.deep_copy()

    def _compile(self, spec: StructuredOutput) -> tuple[str, Any]:
        key = (spec.kind, spec.value)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        t0 = time.perf_counter()
        grammar = _grammar_text(spec)
        from llguidance import LLMatcher

        matcher = LLMatcher(self._ll(), grammar, log_level=0, limits=_limits())  # the compile; drops the GIL
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {spec.kind}: {matcher.get_error() or 'rejected by the grammar engine'}")
        self.compile_seconds.append(time.perf_counter() - t0)
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = (grammar, matcher)
                self._compiled_chars += len(grammar)
            while len(self._compiled) > 1 and (len(self._compiled) > _CACHE_GRAMMARS
                                               or self._compiled_chars > _CACHE_CHARS):
                self._compiled_chars -= len(self._compiled.popitem(last=False)[1][0])
        return grammar, matcher

    def start_masks(self, matchers: list[Any]) -> concurrent.futures.Future[torch.Tensor]:
        """The next-token bitmasks [len(matchers), ceil(V/32)] int32 of these matchers, computed on the worker."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        def compute() -> torch.Tensor:
            bitmask = allocate_token_bitmask(len(matchers), self.vocab_size)
            fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
            return bitmask

        return self._pool.submit(compute)


def _limits() -> Any:
    """llguidance's resource limits, stated here because they are what bounds a schema's compile time and a step's
    mask time (their defaults, kept: each refused schema names the limit it hit)."""
    from llguidance import LLParserLimits

    return LLParserLimits(max_grammar_size=500_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                          step_max_items=50_000, max_lexer_states=250_000)


def _grammar_text(spec: StructuredOutput) -> str:
    """A spec as llguidance grammar text (the front-ends: JSON schema, regex, choice, Lark or GBNF); not compiled."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        if spec.kind in ("json_schema", "json_object"):
            schema = json.loads(spec.value) if spec.kind == "json_schema" else {"type": "object"}
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
        if spec.kind == "regex":
            return LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec.value)))
        return LLMatcher.grammar_from_lark(any_to_lark(spec.value))  # "grammar": Lark, or GBNF converted to Lark
    except Exception as e:  # any failure of the grammar front-ends (GBNF/Lark/JSON parsing) is the spec's fault
        raise InvalidRequestError(f"invalid {spec.kind}: {e}") from None


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf the logits [N, V] of every token a row's grammar forbids (bit 0 in its bitmask row).
    bitmask: [len(rows), ceil(V/32)] int32, token t at bit t % 32 of word t // 32 (llguidance's layout)."""
    vocab = logits.shape[-1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # little-endian words
    allowed = torch.from_numpy(bits).to(device=logits.device, dtype=torch.bool)
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
