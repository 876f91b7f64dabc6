"""What loraplex does with each of vLLM's serve flags (and the `LLM(...)` keywords of the same names): accepted
(what it asks for is already so here; logged once), mapped (to the loraplex setting that means the same), or
refused by name with one line saying why. None is dropped silently. The flags themselves are vLLM's parser's
(vllm_serve_flags.py); the command line's side (reading them out of argv, the docs table) is cli_vllm.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loraplex.errors import LoraplexError
from loraplex.vllm_serve_flags import SERVE_FLAGS

ONE_ENGINE = ("loraplex runs one engine on one device; for more, `loraplex cluster --replicas N` runs engine replicas "
              "on Ray Serve")
# Why a group's flags are refused, unless a rule below says otherwise (vLLM's config groups).
GROUP_REASONS = {
    "MultiModalConfig": "loraplex serves text-only models",
    "ParallelConfig": ONE_ENGINE,
    "OffloadConfig": "loraplex keeps the base model's weights on its device (quantize it instead: --quantize nf4)",
    "MambaConfig": "loraplex serves Llama-family transformers, not Mamba models",
    "KernelConfig": "loraplex picks its kernels from the hardware (lora/kernel_choice.py); there is no choice to make",
    "AttentionConfig": "loraplex has one attention implementation per device; there is no backend to choose",
    "CompilationConfig": "loraplex captures no CUDA graphs",
    "ObservabilityConfig": "loraplex's metrics are its Prometheus /metrics and /v1/stats; this vLLM option has no "
                           "counterpart",
    "StructuredOutputsConfig": "loraplex has no reasoning parsers",
    "LoggingConfig": "loraplex logs through Python's logging at --log-level; vLLM's logging files do not apply",
    "VllmConfig": "loraplex has no such subsystem (speculative decoding, KV transfer, compilation configs)",
    "LoRAConfig": "this LoRA option of vLLM has no counterpart in loraplex",
    "CacheConfig": "this KV cache option of vLLM has no counterpart in loraplex (--kv-cache-memory sets the budget)",
    "SchedulerConfig": "this scheduler option of vLLM has no counterpart in loraplex",
    "ModelConfig": "this model option of vLLM has no counterpart in loraplex",
    "LoadConfig": "loraplex loads local safetensors or GGUF files only",
    "Frontend": "this server option of vLLM has no counterpart in loraplex",
    "options": "this vLLM process option has no counterpart in loraplex",
}

# Flags (exactly as written) whose request loraplex already meets: accepted, the reason logged once.
ACCEPTED = {
    "--enforce-eager": "loraplex captures no CUDA graphs: every step runs eagerly already",
    "--trust-remote-code": "loraplex never runs code from a model's repository: its own Llama implementation serves "
                           "the weights",
    "--no-trust-remote-code": "loraplex never runs code from a model's repository",
    "--disable-log-requests": "loraplex never logs a request's prompt or output",
    "--no-enable-log-requests": "loraplex never logs a request's prompt or output",
    "--disable-log-stats": "loraplex logs no periodic stats; /metrics and /v1/stats carry them",
    "--enable-chunked-prefill": "long prompts are always prefilled in chunks of --max-num-batched-tokens",
    "--enable-auto-tool-choice": "tool_choice auto is always served: tool calls are held to their schema by a grammar",
}
# Flags accepted with these values only (the value as written, or a test of it), else refused with the reason.
ONLY = {
    "--tensor-parallel-size": ({"1"}, ONE_ENGINE),
    "--pipeline-parallel-size": ({"1"}, ONE_ENGINE),
    "--data-parallel-size": ({"1"}, ONE_ENGINE),
    "--decode-context-parallel-size": ({"1"}, ONE_ENGINE),
    "--prefill-context-parallel-size": ({"1"}, ONE_ENGINE),
    "--nnodes": ({"1"}, ONE_ENGINE),
    "--load-format": ({"auto", "safetensors", "gguf"}, "loraplex loads local safetensors or GGUF files only"),
    "--kv-cache-dtype": ({"auto"}, "the KV cache is kept in the model's dtype"),
    "--lora-dtype": ({"auto"}, "LoRA runs in the serving dtype"),
    "--scheduling-policy": ({"fcfs", "priority"}, "loraplex shares the batch between tenants by weight and orders "
                                                  "each tenant's requests by priority, then arrival"),
    "--optimization-level": ({"0", "O0"}, "loraplex compiles nothing (no torch.compile, no CUDA graphs)"),
    "--generation-config": ({"auto"}, "loraplex reads the model's own generation config"),
    "--max-logprobs": ({str(n) for n in range(21)}, "loraplex returns at most 20 top log-probabilities (OpenAI's "
                                                    "cap)"),
}
# Flags that mean a loraplex setting: the argparse dest they set, and how their value converts.
MAPPED: dict[str, tuple[str, Callable[[str], object]]] = {
    "--seed": ("engine_seed", int),
    "--uvicorn-log-level": ("log_level", str.lower),
    "--block-size": ("block_size", int),
    "--kv-cache-memory-bytes": ("kv_cache_memory", int),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float),
}
# Flags refused for a reason of their own, not their group's.
REFUSED = {
    "--ssl-keyfile": "loraplex serves plain HTTP: terminate TLS in a reverse proxy",
    "--ssl-certfile": "loraplex serves plain HTTP: terminate TLS in a reverse proxy",
    "--ssl-ca-certs": "loraplex serves plain HTTP: terminate TLS in a reverse proxy",
    "--tokenizer": "loraplex uses the model directory's own tokenizer",
    "--revision": "loraplex reads local model directories and GGUF files; there is no hub revision to pick",
    "--download-dir": "loraplex reads local model directories and GGUF files; it downloads nothing",
    "--hf-token": "loraplex reads local model directories and GGUF files; it downloads nothing",
    "--enable-log-requests": "loraplex never logs a request's prompt or output (the dashboard shows its timing)",
    "--uds": "loraplex listens on TCP (--host, --port)",
    "--allowed-methods": "loraplex's CORS allows every method of the API for the allowed origins",
    "--allowed-headers": "loraplex's CORS allows every header for the allowed origins",
    "--allow-credentials": "loraplex's keys are bearer headers, never cookies: CORS credentials are not needed",
    "--no-enable-lora": "LoRA is always on in loraplex",
    "--no-enforce-eager": "loraplex captures no CUDA graphs",
    "--enable-prompt-embeds": "loraplex takes text and token ids, not prompt embeddings",
}


@dataclass(frozen=True, slots=True)
class VllmFlag:
    names: tuple[str, ...]  # the flag and its aliases, the canonical long one first
    group: str
    nargs: int | str | None  # 0: a switch

    @property
    def name(self) -> str:
        return self.names[0]


def _catalog() -> dict[str, VllmFlag]:
    """Every spelling of every vLLM serve flag -> the flag; a switch's --no- form is its own flag."""
    found: dict[str, VllmFlag] = {}
    for names, group, nargs in SERVE_FLAGS:
        longs = sorted((n for n in names if n.startswith("--")), key=lambda n: n.startswith("--no-"))
        if nargs == 0 and len(longs) == 2:  # a switch and its --no- form: two flags of opposite meaning
            for n in longs:
                found[n] = VllmFlag((n,), group, 0)
            continue
        flag = VllmFlag(tuple(longs + [n for n in names if not n.startswith("--")]), group, nargs)
        for n in names:
            found[n] = flag
    # Spellings of older vLLM releases, kept if a regenerated table drops them (0.32 still has the second one).
    for legacy, group in (("--disable-log-requests", "options"), ("--gpu-memory-utilization", "CacheConfig")):
        found.setdefault(legacy, VllmFlag((legacy,), group, 0 if legacy.startswith("--disable") else None))
    return found


CATALOG = _catalog()


def canonical(flag: VllmFlag) -> str:
    """The spelling the rules use: a mapped or restricted flag's first alias that has a rule, else its first."""
    return next((n for n in flag.names if n in ACCEPTED or n in ONLY or n in MAPPED or n in REFUSED), flag.name)


class RefusedFlagError(LoraplexError):
    """A vLLM flag (or LLM keyword) that asks for what loraplex cannot do, or a value it cannot take."""


def apply_vllm_flags(taken: list[tuple[VllmFlag, list[str]]], set_value: Callable[[str, object], None]) -> list[str]:
    """Accept, map or refuse each of vLLM's flags (`split_vllm_flags`); `set_value(dest, value)` sets a mapped one.
    Returns one line per accepted or mapped flag, for the log (which is set up only once the flags are read)."""
    notes = []
    for flag, values in taken:
        rule = canonical(flag)
        shown = " ".join([rule, *values])
        if rule in ACCEPTED:
            notes.append(f"vLLM's {rule}: accepted, {ACCEPTED[rule]}")
        elif rule in ONLY:
            allowed, why = ONLY[rule]
            if values and values[0] in allowed:
                notes.append(f"vLLM's {shown}: accepted, loraplex does the same")
            else:
                raise RefusedFlagError(f"vLLM's {shown} is refused: {why}")
        elif rule in MAPPED:
            dest, convert = MAPPED[rule]
            try:
                set_value(dest, convert(values[0]))
            except (ValueError, IndexError):
                raise RefusedFlagError(f"{rule} takes one value, got {' '.join(values) or 'none'}") from None
            notes.append(f"vLLM's {shown}: sets loraplex's {dest}")
        else:
            why = REFUSED.get(rule) or GROUP_REASONS.get(flag.group, "it has no counterpart in loraplex")
            raise RefusedFlagError(f"vLLM's {rule} is refused: {why}")
    return notes


def llm_kwargs(kwargs: dict[str, object], fields: set[str]) -> tuple[dict[str, object], list[str]]:
    """vLLM's `LLM(...)` keywords for the offline engine: one that is an EngineConfig field (`fields`) passes
    through; one that names a vLLM serve flag gets that flag's rule (accepted, mapped to a field, or refused with a
    ValueError naming the keyword and why); a switch set to False asks for nothing and is dropped. Any other is left
    for EngineConfig to refuse (TypeError). Returns the config keywords and one line per accepted or mapped one."""
    config: dict[str, object] = {}
    notes: list[str] = []
    for key, value in kwargs.items():
        flag = CATALOG.get("--" + key.replace("_", "-"))
        if key in fields or flag is None:
            config[key] = value
            continue
        if flag.nargs == 0 and value is False:
            continue

        def set_value(dest: str, v: object) -> None:
            field = {"engine_seed": "seed"}.get(dest, dest)
            if field not in fields:
                raise RefusedFlagError(f"it sets the server's {dest}, which the offline engine does not have")
            config[field] = v

        try:
            notes += apply_vllm_flags([(flag, [] if flag.nargs == 0 else [str(value)])], set_value)
        except RefusedFlagError as e:
            raise ValueError(f"LLM({key}={value!r}) is refused: {str(e).partition(' is refused: ')[2] or e}") from None
    return config, notes


def what_happens(flag: VllmFlag, ours: set[str]) -> str:
    """One line for docs/serving.md's table: what loraplex does with `flag`."""
    mine = [n for n in flag.names if n in ours]
    if mine:
        return f"loraplex's own `{mine[0]}`"
    rule = canonical(flag)
    if rule in ACCEPTED:
        return f"accepted: {ACCEPTED[rule]}"
    if rule in ONLY:
        allowed, why = ONLY[rule]
        shown = ", ".join(sorted(allowed, key=lambda v: (len(v), v))[:3]) + ("..." if len(allowed) > 3 else "")
        return f"accepted as {shown}; else refused: {why}"
    if rule in MAPPED:
        return f"sets loraplex's {MAPPED[rule][0]}"
    return "refused: " + (REFUSED.get(rule) or GROUP_REASONS.get(flag.group, "no counterpart"))
