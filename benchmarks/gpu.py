"""The suite's GPU half: loraplex (Triton multi-LoRA kernels, lora/triton_ops.py) against PEFT's mixed batch,
on a Llama-architecture model of 1B-8B shape with random weights, in one run.

    .venv/bin/python -m benchmarks.gpu [--shape 1b|3b|8b] [--requests 64 --max-tokens 64 --adapters 32]
    .venv/bin/python -m benchmarks.gpu --device cpu --shape tiny     # the same code on the CPU: a check of
                                                                     # the script, its figures mean nothing

The weights are random (seeded, transformers' initialisation) in bf16: the figures are about speed only,
and the report says so. The tokenizer and vocabulary are the default model's. Adapters: made by PEFT on that
model, rank 16 on q,k,v,o, random (loraplex.training.synthetic). Workload: `--requests` prompts (the shared
offline prompts), `--max-tokens` new tokens each, greedy, EOS ignored, adapters round-robin.

Figures (results/gpu.json): loraplex base only; loraplex with `--adapters` distinct adapters in the batch
(the LoRA tax: 1 - adapters / base); PEFT's mixed batch `generate(adapter_names=...)` with the same adapters
on the same device (loraplex / PEFT). Targets from the issue: tax <= 15% with 32 adapters in a batch of 64;
>= 5x PEFT's mixed batch.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import default_model_dir, machine, round_robin, workload_prompts, write_json

# Llama 3.2 1B / 3B and Llama 3.1 8B layer shapes; "tiny" checks the script on a CPU.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_model(out: Path, shape: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A Llama model directory of `shape` with random bf16 weights and the default model's tokenizer; and the
    model itself (on the CPU), to make adapters on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = default_model_dir()
    cfg = AutoConfig.from_pretrained(src)
    for key, value in SHAPES[shape].items():
        setattr(cfg, key, value)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in src.iterdir():  # tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")) or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    return out, model


def random_adapters(model: torch.nn.Module, root: Path, count: int, rank: int = 16) -> list[str]:
    """`count` distinct random rank-`rank` q,k,v,o adapters made by PEFT on `model` (loraplex.training.synthetic)."""
    from loraplex.training.synthetic import random_adapter

    names = [f"g{i}" for i in range(count)]
    for i, name in enumerate(names):
        random_adapter(model, root / name, r=rank, alpha=2 * rank, targets=TARGETS, seed=i, strength=0.3)
    return names


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def loraplex_runs(model_dir: Path, root: Path, names: list[str], prompts: list[str], max_tokens: int,
                  device: str) -> dict[str, Any]:
    from loraplex import LLM, SamplingParams

    llm = LLM(str(model_dir), device=device, dtype="bfloat16", adapter_dir=str(root), max_loras=len(names),
              max_cpu_loras=len(names), max_num_seqs=len(prompts), max_num_batched_tokens=8192,
              max_model_len=512)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out: dict[str, Any] = {}
    for label, adapters in (("base", [None] * len(prompts)), (str(len(names)), round_robin(names, len(prompts)))):
        llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapters)  # warm-up, loads
        sync(device)
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, adapters)
        sync(device)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.outputs[0].token_ids) for r in res)
        out[label] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
        print(f"loraplex {label}: {tokens / seconds:.1f} tok/s", flush=True)
    del llm
    gc.collect()
    return out


def peft_mixed(model_dir: Path, root: Path, names: list[str], prompts: list[str], max_tokens: int,
               device: str) -> dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.peers_hf import batch_tokenizer, static_batch

    tok = batch_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(root / n), adapter_name=n)
    model.eval()
    adapters = round_robin(names, len(prompts))

    static_batch(model, tok, prompts[:4], 4, adapter_names=adapters[:4])  # warm-up
    sync(device)
    r = static_batch(model, tok, prompts, max_tokens, adapter_names=adapters)
    print(f"PEFT mixed batch, {len(names)} adapters: {r['tokens_per_s']:.1f} tok/s", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    info = machine()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model = random_model(Path(tmp) / f"llama-{args.shape}-random", args.shape)
        names = random_adapters(model, Path(tmp) / "adapters", args.adapters)
        del model
        gc.collect()
        prompts = workload_prompts(AutoTokenizer.from_pretrained(model_dir), args.requests)
        ours = loraplex_runs(model_dir, Path(tmp) / "adapters", names, prompts, args.max_tokens, args.device)
        result: dict[str, Any] = {
            "machine": info, "device": args.device, "shape": args.shape, "shape_config": SHAPES[args.shape],
            "weights": "random (seeded), bf16", "requests": args.requests, "max_tokens": args.max_tokens,
            "adapters": args.adapters, "loraplex": ours,
            "lora_tax": 1 - ours[str(args.adapters)]["tokens_per_s"] / ours["base"]["tokens_per_s"]}
        if not args.skip_peft:
            result["peft_mixed"] = peft_mixed(model_dir, Path(tmp) / "adapters", names, prompts, args.max_tokens,
                                              args.device)
            result["vs_peft"] = ours[str(args.adapters)]["tokens_per_s"] / result["peft_mixed"]["tokens_per_s"]
    print(f"LoRA tax with {args.adapters} adapters in a batch of {args.requests}: {100 * result['lora_tax']:.1f}%"
          + (f"; {result['vs_peft']:.2f}x PEFT's mixed batch" if "vs_peft" in result else ""))
    print(f"written to {write_json('gpu', result)}")


if __name__ == "__main__":
    main()
