"""Shared benchmark helpers: PEFT-made adapters on the default model, machine facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from loraplex import LLM

# Where a part writes its JSON: run_all points this at results/<cpu class> for the parts it starts.
RESULTS = Path(os.environ.get("LORAPLEX_RESULTS", "results"))


def machine() -> dict[str, Any]:
    """What a figure was measured on: the CPU, its class (what torch dispatches to, caps included) and the dtype
    `auto` resolves to there, the versions."""
    import transformers

    from loraplex import hardware

    info = hardware.cpu()
    flags = sorted(f for f in info.flags if f.startswith(("avx", "amx", "fma")))
    return {"cpu": info.model, "cpu_class": info.cpu_class, "cpu_description": info.describe(), "isa_flags": flags,
            "dtype": hardware.resolve_dtype().name, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "python": platform.python_version()}


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) CPU jiffies since boot from /proc/stat; None where there is none (not Linux) or no steal
    column. Steal is time the hypervisor gave other guests while this one wanted the CPU."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    return (int(fields[7]), sum(int(f) for f in fields[:8])) if len(fields) >= 8 else None


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen between two cpu_times(): a phase measured while it was high measured the
    neighbours too (this project's VMs have seen 15-27% for minutes)."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def class_slug() -> str:
    """The results folder of this machine's CPU class: results/avx512-bf16, results/avx2, ..."""
    from loraplex import hardware

    return hardware.cpu().cpu_class.lower()


def make_adapters(model_dir: Path, root: Path, count: int, r: int = 16,
                  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    """`count` PEFT LoRA adapters (seeded random weights) under root/a{i}; made once, then copied."""
    names = [f"a{i}" for i in range(count)]
    if all((root / n / "adapter_config.json").is_file() for n in names):
        return names
    from transformers import AutoModelForCausalLM

    from loraplex.training.synthetic import random_adapter

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seeds = min(count, 8)  # 8 distinct weight sets, copied to reach `count` names
    for i in range(seeds):
        random_adapter(base, root / names[i], r=r, alpha=2 * r, targets=targets, seed=i, strength=0.3)
    for i in range(seeds, count):
        shutil.copytree(root / names[i % seeds], root / names[i], dirs_exist_ok=True)
    return names


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


# ---- the shared offline workload: the same prompts, adapters and decoding for loraplex and every peer ----

TOPICS = ["a lighthouse keeper", "the history of tea", "how bridges stand", "a robot learning to paint",
          "the water cycle", "a city under the sea", "why the sky is blue", "a chess tournament"]


def workload_prompts(tokenizer: Any, count: int = 32) -> list[str]:
    """`count` chat-templated prompt texts (varied lengths), identical for every system under test."""
    msgs = [[{"role": "user", "content": f"Tell me a story about {TOPICS[i % len(TOPICS)]}, part {i + 1}."}]
            for i in range(count)]
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]


def warmup(prompts: list[str]) -> list[str]:
    """Warm-up prompts that share no KV block with `prompts`: a prefix cache (loraplex's, vLLM's, llama.cpp's) must
    not serve the timed pass from the warm-up (benchmarks.peers.vllm_offline does the same)."""
    return ["Warm-up. " + p for p in prompts]


def round_robin(names: list[str], count: int) -> list[str]:
    """Request i uses adapter i % len(names): every adapter appears, evenly, in one batch."""
    return [names[i % len(names)] for i in range(count)]


def default_model_dir() -> Path:
    """The embedded default model as a Hugging Face directory (converted and cached on first use)."""
    from loraplex.models.loader import resolve_model

    return resolve_model(None)


def bf16_copy(model_dir: Path, out: Path) -> Path:
    """`model_dir` saved as a bf16 checkpoint in `out` (what most Hugging Face checkpoints are): every tensor rounded to
    bf16, the config saying so, the tokenizer beside it. Made once: an existing `out` is returned as it is."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    for f in model_dir.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(f)).items()}, str(out / f.name),
                  metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # last: marks the copy whole
    return out


def step_timed(llm: LLM, prompts: list[str], adapters: list[str | None], max_tokens: int, tag: str
               ) -> tuple[float, float, int, list[list[int]]]:
    """The batch queued at once, stepped to the end: (prefill seconds, decode seconds, decode tokens, answers).
    Each engine step is timed: a step where every request has its prompt computed is a decode step."""
    from loraplex import SamplingParams

    e = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [e.add_request(p, params, a, f"{tag}-{i}") for i, (p, a) in enumerate(zip(prompts, adapters))]
    prefill = decode = 0.0
    tokens = 0
    answers: dict[str, list[int]] = {}
    while e.has_unfinished_requests():
        decoding = [r for r in e.requests.values() if r.num_computed_tokens >= len(r.prompt_token_ids)]
        all_decode = len(decoding) == len(e.requests)
        t0 = time.perf_counter()
        outs = e.step()
        dt = time.perf_counter() - t0
        if all_decode:
            decode += dt
            tokens += len(decoding)
        else:
            prefill += dt
        answers.update({o.request_id: list(o.outputs[0].token_ids) for o in outs if o.finished})
    return prefill, decode, tokens, [answers[i] for i in ids]
