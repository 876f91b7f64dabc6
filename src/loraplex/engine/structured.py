"""Structured outputs: JSON schema, any JSON object, regex, a choice of strings, a Lark or GBNF grammar, through
llguidance (guidance-ai's grammar engine, also vLLM's and SGLang's).

Why llguidance: it computes a request's token mask lazily from the grammar and the tokenizer's token trie, in
tens of microseconds a token, with no per-schema precompilation over the vocabulary and no torch dependency;
its JSON compiler follows JSON Schema closely and lets us fix the whitespace (`whitespace_flexible: false`: one
space after ',' and ':', no newlines), so a small model cannot pad an object with newlines until it runs out of
tokens. A grammar is compiled once per spec (an LRU of 256), a matcher made per request. Each step, the masks of
the step's constrained rows are computed on a worker thread (llguidance releases the GIL) while the forward pass
runs, then applied to those rows' logits; unconstrained rows are never touched.
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

# Compact, bounded JSON: a single space after separators, nowhere else.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputs:
    """Grammars (cached) and per-request matchers for one tokenizer and vocabulary."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = eos_ids
        self._tokenizer: Any = None  # llguidance.LLTokenizer, built on first use (~1 s)
        self._executor: Any = None
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loraplex-grammar")
        self.compile_seconds: list[float] = []  # per grammar compiled (benchmarks)

    def _ll(self) -> Any:
        if self._tokenizer is None:
            import llguidance
            import llguidance.hf

            tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos[0])
            self._executor = llguidance.LLExecutor()
            # The first mask pays a one-time set-up (~0.8 s here): pay it now, with the first constrained
            # request's validation, not inside a decode step that other requests share.
            warm = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}),
                                        log_level=0)
            from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

            fill_next_token_bitmask_par(self._executor, [(warm, 0)], allocate_token_bitmask(1, self.vocab_size))
            self._tokenizer = tokenizer
        return self._tokenizer

    def grammar(self, spec: StructuredOutput) -> str:
        """The llguidance grammar of a spec, compiled and validated once; InvalidRequestError names the problem."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        key = (spec.kind, spec.value)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        t0 = time.perf_counter()
        try:
            if spec.kind in ("json_schema", "json_object"):
                schema = json.loads(spec.value) if spec.kind == "json_schema" else {"type": "object"}
                grammar = LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
            elif spec.kind == "regex":
                grammar = LLMatcher.grammar_from_regex(spec.value)
            elif spec.kind == "choice":
                grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec.value)))
            else:  # "grammar": Lark, or GBNF converted to Lark
                grammar = LLMatcher.grammar_from_lark(any_to_lark(spec.value))
        except Exception as e:  # any failure of the grammar front-ends (GBNF/Lark/JSON parsing) is the spec's fault
            raise InvalidRequestError(f"invalid {spec.kind}: {e}") from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._ll())
        if is_error:
            raise InvalidRequestError(f"invalid {spec.kind}: {messages[0] if messages else 'rejected by the grammar engine'}")
        self.compile_seconds.append(time.perf_counter() - t0)
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > 256:
                self._grammars.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutput) -> Any:
        """A fresh matcher (llguidance.LLMatcher) at the start of the grammar, for one request."""
        from llguidance import LLMatcher

        m = LLMatcher(self._ll(), self.grammar(spec), log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"invalid {spec.kind}: {m.get_error()}")
        return m

    def start_masks(self, matchers: list[Any]) -> concurrent.futures.Future[torch.Tensor]:
        """The next-token bitmasks [len(matchers), ceil(V/32)] int32 of these matchers, computed on the worker."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        def compute() -> torch.Tensor:
            bitmask = allocate_token_bitmask(len(matchers), self.vocab_size)
            fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
            return bitmask

        return self._pool.submit(compute)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf the logits [N, V] of every token a row's grammar forbids (bit 0 in its bitmask row).
    bitmask: [len(rows), ceil(V/32)] int32, token t at bit t % 32 of word t // 32 (llguidance's layout)."""
    vocab = logits.shape[-1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # little-endian words
    allowed = torch.from_numpy(bits).to(device=logits.device, dtype=torch.bool)
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
