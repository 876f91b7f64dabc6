"""vLLM's serve flags that loraplex does not have as its own: each is accepted (what it asks for is already so here;
logged once), mapped (to the loraplex setting that means the same), or refused by name with one line saying why.
None is dropped silently. The flags themselves are vLLM's parser's (vllm_serve_flags.py); this file says what
loraplex does with each, and docs/vllm_flags.md is `flag_doc()`'s (tests/test_cli_vllm.py checks that it is current).

`split_vllm_flags` runs before argparse: it takes vLLM's flags and their values out of the command line, so that a
value (`-tp 1`) is never read as the positional model, and leaves every other token to argparse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loraplex.cli_forms import CommandLineError
from loraplex.vllm_serve_flags import SERVE_FLAGS, VLLM_VERSION

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
    "--scheduling-policy": ({"fcfs"}, "loraplex admits requests first come, first served; vLLM's priority policy "
                                      "has no counterpart yet"),
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


def split_vllm_flags(argv: list[str], ours: set[str]) -> tuple[list[str], list[tuple[VllmFlag, list[str]]]]:
    """argv without the vLLM flags that are not `ours`, and those flags with their values (vLLM's nargs)."""
    rest: list[str] = []
    taken: list[tuple[VllmFlag, list[str]]] = []
    n = 0
    while n < len(argv):
        word = argv[n]
        name, eq, inline = word.partition("=")
        flag = CATALOG.get(name) if word.startswith("-") and name not in ours else None
        if flag is None:
            rest.append(word)
            n += 1
            continue
        n += 1
        values = [inline] if eq else []
        if not eq and flag.nargs is None:
            if n >= len(argv):
                raise CommandLineError(f"{name} needs a value")
            values, n = [argv[n]], n + 1
        elif not eq and flag.nargs in ("+", "*", "?"):
            while n < len(argv) and not argv[n].startswith("-"):
                values.append(argv[n])
                n += 1
        taken.append((flag, values))
    return rest, taken


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
                raise CommandLineError(f"vLLM's {shown} is refused: {why}")
        elif rule in MAPPED:
            dest, convert = MAPPED[rule]
            try:
                set_value(dest, convert(values[0]))
            except (ValueError, IndexError):
                raise CommandLineError(f"{rule} takes one value, got {' '.join(values) or 'none'}") from None
            notes.append(f"vLLM's {shown}: sets loraplex's {dest}")
        else:
            why = REFUSED.get(rule) or GROUP_REASONS.get(flag.group, "it has no counterpart in loraplex")
            raise CommandLineError(f"vLLM's {rule} is refused: {why}")
    return notes


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


def flag_table(ours: set[str]) -> str:
    """The Markdown table of every vLLM serve flag (one row per flag, its aliases beside it)."""
    seen: set[int] = set()
    rows = [f"| vLLM {VLLM_VERSION} flag | group | loraplex |", "|---|---|---|"]
    for flag in CATALOG.values():
        if id(flag) in seen:
            continue
        seen.add(id(flag))
        names = ", ".join(f"`{n}`" for n in flag.names)
        rows.append(f"| {names} | {flag.group} | {what_happens(flag, ours)} |")
    return "\n".join(rows) + "\n"


DOC_HEAD = """# vLLM's serve flags in loraplex

Every flag of `vllm serve` {version} and what `loraplex serve` does with it: loraplex's own flag of that name,
accepted (what it asks for is already so here; the reason is logged once at start), mapped to the loraplex setting
that means the same, or refused by name with the reason. None is ignored silently. A `--config FILE.yaml` setting
is treated as the flag of its name. Written by `.venv/bin/python src/loraplex/cli_vllm.py` from that file's
rules (tests/test_cli_vllm.py checks that it is current); the flags themselves are read from vLLM's parser by
`benchmarks/peers/vllm_serve_flags.py`.

"""


def serve_flags() -> set[str]:
    """`loraplex serve`'s own flags (and the top level's)."""
    from loraplex.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(subparsers.choices["serve"]._option_string_actions) | set(parser._option_string_actions)


def flag_doc() -> str:
    return DOC_HEAD.format(version=VLLM_VERSION) + flag_table(serve_flags())


if __name__ == "__main__":
    from pathlib import Path

    out = Path(__file__).resolve().parents[2] / "docs" / "vllm_flags.md"
    out.write_text(flag_doc())
    print(f"wrote {out}")
