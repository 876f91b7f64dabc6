"""LLM: the synchronous, offline API, vLLM's shape: `LLM(...).generate(prompts, sampling_params, lora_request=...)`
and `.chat(messages)`; loraplex's own `adapters=` (names, per prompt) works beside it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from loraplex.vllm_flag_rules import llm_kwargs
from loraplex.adapters.key import AdapterKey
from loraplex.config import EngineConfig
from loraplex.engine.admin import Register
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.outputs import RequestOutput
from loraplex.lora.request import LoRARequest
from loraplex.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = str | list[int] | dict[str, Any]  # text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...}
Conversation = list[dict[str, Any]]


def _per_prompt(value: T | Sequence[T] | None, n: int, what: str, one: type | tuple[type, ...]) -> list[T | None]:
    """One value for every prompt, or a list with one per prompt."""
    if value is None or isinstance(value, one):
        return [value] * n  # type: ignore[list-item]
    values = list(value)  # type: ignore[arg-type]
    if len(values) != n:
        raise ValueError(f"{what} must be one value or a list of one per prompt: {n} prompts, {len(values)} given")
    return values


def _prompt(p: Prompt) -> str | list[int]:
    if isinstance(p, dict):
        extra = set(p) - {"prompt", "prompt_token_ids"}
        if extra or len(p) != 1:
            raise ValueError(f"a prompt dict holds one of 'prompt' or 'prompt_token_ids' (text only), got {sorted(p)}")
        return p.get("prompt", p.get("prompt_token_ids"))  # type: ignore[return-value]
    return p


class LLM:
    """Serve the base model and many LoRA adapters in one batch.

    >>> llm = LLM(lora_modules={"legal": "adapters/legal"})
    >>> outs = llm.generate(["Hi", "Hi"], SamplingParams(max_tokens=8), adapters=[None, "legal"])
    >>> outs = llm.generate("Hi", SamplingParams(max_tokens=8), lora_request=LoRARequest("sql", 1, "adapters/sql"))

    vLLM's engine keywords (`enable_lora=True`, `enforce_eager`, `tensor_parallel_size=1`, ...) get the rule of the
    serve flag of that name (docs/vllm_flags.md): accepted, mapped, or refused naming why.
    """

    def __init__(self, model: str | None = None, *, lora_modules: dict[str, str] | None = None, **kwargs: Any) -> None:
        modules = tuple((k, str(v)) for k, v in (lora_modules or {}).items())
        config, notes = llm_kwargs(kwargs, {f.name for f in dataclasses.fields(EngineConfig)})
        for note in notes:
            log.info(note)
        self.engine = LLMEngine(EngineConfig(model=model, lora_modules=modules, **config))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer
        self._lora_ids: dict[int, tuple[str, Path, AdapterKey]] = {}  # lora_int_id -> (name, path, its version)

    def register_adapter(self, name: str, path: str) -> None:
        """Load, validate and register (promoted) a version of adapter `name`; requests name it as `model`."""
        self.engine.admin(Register(name, path))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
        cache_salt: str | None = None,
        *,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, all requests batched together; outputs come back in prompt order.

        `sampling_params` (or `sampling`): one for all prompts or one each. The adapter of each prompt: `adapters`
        (registered names, None = the base model) or vLLM's `lora_request` (registered on first use), one for
        all or one each. `use_tqdm`: a progress bar of finished prompts (or a tqdm-like class to make it).

        All requests are validated before any runs: a bad one raises its error and none is queued. Prompt
        blocks cached by earlier requests of the same adapter version (and `cache_salt`) are reused."""
        if sampling is not None and sampling_params is not None:
            raise ValueError("give sampling_params or sampling (its older name), not both")
        if adapters is not None and lora_request is not None:
            raise ValueError("give adapters (names) or lora_request (vLLM's LoRARequest), not both")
        one = isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and bool(prompts)
                                                    and all(isinstance(t, int) for t in prompts))
        texts = [_prompt(p) for p in ([prompts] if one else prompts)]  # type: ignore[list-item]
        n = len(texts)
        samplings = _per_prompt(sampling_params or sampling, n, "sampling_params", SamplingParams)
        names: list[str | AdapterKey | None]  # text is parsed once, by add_request
        if lora_request is not None:
            names = [None if r is None else self._adapter_of(r)
                     for r in _per_prompt(lora_request, n, "lora_request", LoRARequest)]
        else:
            names = _per_prompt(adapters, n, "adapters", str)
        ids: list[str] = []
        try:
            for p, s, a in zip(texts, samplings, names):
                ids.append(self.engine.add_request(p, s or SamplingParams(), a, cache_salt=cache_salt))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        final: dict[str, RequestOutput] = {}
        make_bar = use_tqdm if callable(use_tqdm) else tqdm
        with make_bar(total=n, desc="Processed prompts", unit="prompt", disable=use_tqdm is False) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        errors = [final[rid].error for rid in ids if final[rid].error is not None]
        if errors:  # e.g. an adapter that failed to load; the other requests did complete
            raise errors[0]  # type: ignore[misc]
        return [final[rid] for rid in ids]

    def _adapter_of(self, req: LoRARequest) -> AdapterKey:
        """The registered version a LoRARequest runs on: registered on the id's first use, the same version after.
        One id never names two adapters (vLLM would silently serve the first)."""
        path = Path(req.lora_path).expanduser().resolve()
        known = self._lora_ids.get(req.lora_int_id)
        if known is None:
            key = self.engine.admin(Register(req.lora_name, path))
            known = self._lora_ids[req.lora_int_id] = (req.lora_name, path, key)
        if known[:2] != (req.lora_name, path):
            raise ValueError(f"lora_int_id {req.lora_int_id} is adapter {known[0]!r} at {known[1]}; this request "
                             f"gives {req.lora_name!r} at {path}: one id per adapter")
        return known[2]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
        *,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Like generate, with each conversation (one, or a list of them) rendered through the chat template
        (the model's, or `chat_template`); one output per conversation."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations: list[Conversation] = [messages] if one else list(messages)  # type: ignore[list-item]
        prompts = [self.apply_chat_template(c, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message, tools=tools)
                   for c in conversations]
        return self.generate(prompts, sampling_params, adapters, lora_request=lora_request, use_tqdm=use_tqdm,
                             sampling=sampling)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prompt block; returns how many were cached."""
        return self.engine.reset_prefix_cache()

    def apply_chat_template(self, messages: Conversation, *, chat_template: str | None = None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the last message: set add_generation_prompt=False")
        text = self.tokenizer.apply_chat_template(messages, chat_template=chat_template, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
