"""LLM: the synchronous, offline API. `LLM(...).generate(prompts, adapters=..., sampling=...)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.outputs import RequestOutput
from loraplex.sampling import SamplingParams


class LLM:
    """Serve the base model and many LoRA adapters in one batch.

    >>> llm = LLM(lora_modules={"legal": "adapters/legal"})
    >>> outs = llm.generate(["Hi", "Hi"], adapters=[None, "legal"], sampling=SamplingParams(max_tokens=8))
    """

    def __init__(self, model: str | None = None, *, lora_modules: dict[str, str] | None = None, **kwargs: Any) -> None:
        modules = tuple((k, str(v)) for k, v in (lora_modules or {}).items())
        self.engine = LLMEngine(EngineConfig(model=model, lora_modules=modules, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def register_adapter(self, name: str, path: str) -> None:
        self.engine.register_adapter(name, path)

    def generate(
        self,
        prompts: str | Sequence[str | list[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, all requests batched together; outputs come back in prompt order.

        All requests are validated before any runs: a bad one raises its error and none is queued. Prompt
        blocks cached by earlier requests of the same adapter version (and `cache_salt`) are reused."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = len(prompts)
        samplings = list(sampling) if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * n
        names = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n  # type: ignore[list-item]
        if len(samplings) != n or len(names) != n:
            raise ValueError("sampling and adapters must be single values or have one entry per prompt")
        ids: list[str] = []
        try:
            for p, s, a in zip(prompts, samplings, names):
                ids.append(self.engine.add_request(p, s, a, cache_salt=cache_salt))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        errors = [final[rid].error for rid in ids if final[rid].error is not None]
        if errors:  # e.g. an adapter that failed to load; the other requests did complete
            raise errors[0]  # type: ignore[misc]
        return [final[rid] for rid in ids]

    def chat(
        self,
        conversations: Sequence[list[dict[str, str]]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Like generate, with each conversation rendered through the model's chat template."""
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling, adapters)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prompt block; returns how many were cached."""
        return self.engine.reset_prefix_cache()

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
