"""llama.cpp and loraplex on the same GGUF weights (issue 32): the embedded default's Q4_1 file as shipped, and a
Q8_0 conversion of the model, base only and with 8 adapters mixed, decode tokens per second at batch 1 and 8.

    .venv/bin/python -m benchmarks.peers.llama_cpp_gguf [--batches 1 8] [--max-tokens 64] [--formats q4_1 q8_0]

loraplex serves each file with `--quantization gguf` (its decoder linears, tied head and embeddings on the file's
blocks through the fused CPU kernel; activations, LoRA and the KV cache in `--dtype auto`). llama.cpp's llama-server
loads the same file (its own fused integer dot products), with the KV cache in the same precision, both cores, and
the 8 PEFT adapters converted to GGUF LoRA (f32) loaded at scale 0, each request naming its own. Requests are greedy,
EOS ignored, the batch sent at once; the same chat-templated prompts for both.

Decode only, on both sides: loraplex's engine steps in which every request decodes (benchmarks.common.step_timed);
for llama.cpp the wall time of the batch to `--max-tokens` less that of the batch to its first token. Base only runs
on a llama-server without adapters (loaded at scale 0, they still run for a request that names none). The median of
`--reps` runs.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import default_model_dir, machine, make_adapters, warmup, workload_prompts, write_json
from benchmarks.peers.llama_cpp import OUTTYPE, Server, complete, convert_base, convert_loras
from benchmarks.peers.llama_cpp_build import VERSION
from benchmarks.quantized import decode_rates
from loraplex import LLM
from loraplex.hardware import resolve_dtype
from loraplex.models.loader import default_gguf_path

KINDS = ("base", "8_adapters")


def gguf_file(fmt: str, model_dir: Path) -> Path:
    """q4_1: the file the default model ships as; q8_0: llama.cpp's own conversion of the model."""
    return default_gguf_path() if fmt == "q4_1" else convert_base(model_dir, fmt)


def llama_cpp_rate(url: str, prompts: list[str], loras: list[int | None], max_tokens: int) -> float:
    """Decode tokens per second: the batch at once to `max_tokens`, less the batch at once to its first token (the
    prompts and one step), over the tokens in between. Wall time, so requests llama.cpp runs one after another (it
    does not batch different adapters) count as they run."""
    def wall(n: int) -> float:
        def one(i: int) -> int:
            return int(complete(url, prompts[i], loras[i], n)["tokens_predicted"])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            tokens = list(pool.map(one, range(len(prompts))))
        assert tokens == [n] * len(prompts), tokens  # EOS ignored: every request its n tokens
        return time.perf_counter() - t0

    first = wall(1)
    return len(prompts) * (max_tokens - 1) / (wall(max_tokens) - first)


def measure_llama_cpp(path: Path, loras: list[Path], prompts: list[str], batches: list[int], max_tokens: int,
                      reps: int, cache_type: str) -> dict[str, dict[str, float]]:
    rates: dict[str, dict[str, float]] = {}
    for b in batches:
        for kind in KINDS:
            # Base only on a server without adapters: with adapters loaded at scale 0, a request naming none still
            # runs them all (measured at batch 1 on the AVX2 class: 56 tok/s, against 78 on a server without them).
            with Server(path, [] if kind == "base" else loras, b, 192, cache_type) as server:
                ids: list[int | None] = [None] * b if kind == "base" else [i % len(loras) for i in range(b)]
                llama_cpp_rate(server.url, warmup(prompts[:b]), ids, 4)
                runs = [llama_cpp_rate(server.url, prompts[:b], ids, max_tokens) for _ in range(reps)]
                rates.setdefault(str(b), {})[kind] = statistics.median(runs)
                print(f"  llama.cpp, batch {b}, {kind}: {rates[str(b)][kind]:.1f} tok/s", flush=True)
    return rates


def measure_loraplex(path: Path, adapters: Path, names: list[str], prompts: list[str], batches: list[int],
                     max_tokens: int, reps: int) -> dict[str, dict[str, float]]:
    llm = LLM(model=str(path), quantization="gguf", adapter_dir=str(adapters), max_loras=8,
              enable_prefix_caching=False)
    rates = decode_rates(llm, prompts, names, batches, max_tokens, reps, warm=True)
    for b, kinds in rates.items():
        for kind, rate in kinds.items():
            print(f"  loraplex, batch {b}, {kind}: {rate:.1f} tok/s", flush=True)
    del llm
    gc.collect()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--formats", nargs="+", choices=["q4_1", "q8_0"], default=["q4_1", "q8_0"])
    ap.add_argument("--adapters", type=Path, default=None, help="directory of PEFT adapters a0..a7 (made if absent)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dtype = resolve_dtype()
    cache_type = OUTTYPE[dtype.name]
    model_dir = default_model_dir()
    from transformers import AutoTokenizer

    prompts = workload_prompts(AutoTokenizer.from_pretrained(model_dir), max(args.batches))
    result: dict[str, Any] = {"machine": machine(), "version": f"b{VERSION.split('.')[0]}", "dtype": dtype.name,
                              "kv_cache": cache_type, "max_tokens": args.max_tokens, "batches": args.batches,
                              "reps": args.reps, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(model_dir, root, 8)
        loras = convert_loras(model_dir, [root / n for n in names], "f32")
        for fmt in args.formats:
            path = gguf_file(fmt, model_dir)
            print(f"{fmt} ({path.name}, {path.stat().st_size / 2**20:.0f} MiB):", flush=True)
            ours = measure_loraplex(path, root, names, prompts, args.batches, args.max_tokens, args.reps)
            theirs = measure_llama_cpp(path, loras, prompts, args.batches, args.max_tokens, args.reps, cache_type)
            result["formats"][fmt] = {"file": path.name, "file_bytes": path.stat().st_size, "loraplex": ours,
                                      "llama_cpp": theirs}
    print(f"written to {write_json('llama_cpp_gguf', result)}")


if __name__ == "__main__":
    main()
