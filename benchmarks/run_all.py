"""The whole benchmark suite in one run, loraplex and its peers on the same machine, then the report.

    make bench                                   # = .venv/bin/python -m benchmarks.run_all
    .venv/bin/python -m benchmarks.run_all [--skip vllm serving ...] [--report-dir docs/benchmarks]

Parts, in order, each its own process so none inherits another's threads or memory:
offline (loraplex 0/1/8/32 adapters + the 1..256 scaling sweep), peers_hf (transformers base, PEFT mixed
batch, sequential PEFT, set_adapter), vllm (vLLM CPU 0.32.0 from .venv-vllm: 1/8/32 adapters, base with
LoRA enabled (eager, as the mixed runs) and without (compiled)), llama_cpp (llama-server, base and 8 mixed
adapters), http_peers (64 streams over 8 adapters to loraplex, vLLM CPU and llama.cpp servers), lora_kernels
(kernel profile, mapping cost), cold_load, serving (Poisson/Zipf over HTTP), roofline, quantized (bf16 / NF4 /
int8 base: memory and throughput), llama_cpp_gguf (loraplex and llama-server on the same GGUF files, the shipped
Q4_1 and a Q8_0 conversion: decode at batch 1 and 8, base and 8 adapters), prefix_cache (shared system prompts and 5-turn chats, with and without the
cache, loraplex and vLLM CPU), structured (batch 32 with half the requests under a JSON schema; schema compile
time), fair_share (a quiet key beside another's 160 streams, against first come first served; four keys at weights
1, 1, 1, 3), batch_invariance (--batch-invariant against the default path: decode and prefill at batch 1, 8 and
32 over 8 adapters, and greedy answers alone against in the batch), cluster (2 engine replicas on Ray Serve, Zipf over 64 adapters: affinity routing against queue-length
routing, 2 replicas against 1; about 45 minutes). Every system runs in the dtype loraplex resolves on this machine
(loraplex.hardware: bf16 where the CPU multiplies it natively, else fp32).

Each part writes results/<cpu class>/<part>.json (results/avx512-bf16, results/avx2, ...: a machine capped with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 counts as AVX2, and says so); the
report (benchmarks.report) turns every class measured into REPORT.md, a table per class, and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import class_slug, default_model_dir, make_adapters, workload_prompts
from loraplex.hardware import cpu, resolve_dtype

VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", ".venv-vllm")) / "bin" / "python"
PARTS = ["offline", "peers_hf", "vllm", "llama_cpp", "http_peers", "lora_kernels", "cold_load", "serving", "roofline",
         "quantized", "llama_cpp_gguf", "prefix_cache", "structured", "fair_share", "batch_invariance", "cluster",
         "gpu"]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def vllm_runs(model_dir: Path, root: Path, prompts_file: Path, max_tokens: int, results: Path) -> None:
    """vLLM CPU on the same prompts and adapters. With its defaults it binds one OpenMP thread on this 2-core
    machine (one core reserved); the 8-adapter run is repeated with both cores bound, and both are reported."""
    script = [str(VLLM_PYTHON), "benchmarks/peers/vllm_offline.py", "--model", str(model_dir),
              "--prompts-file", str(prompts_file), "--max-tokens", str(max_tokens), "--max-lora-rank", "16",
              "--dtype", resolve_dtype().name]
    cores = os.cpu_count() or 1
    all_cores = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    for k in (1, 8, 32):
        adapters = [f"a{i}={root / f'a{i}'}" for i in range(k)]
        run(script + ["--adapters", *adapters, "--max-loras", str(k), "--out", str(results / f"vllm_{k}.json")])
    adapters = [f"a{i}={root / f'a{i}'}" for i in range(8)]
    run(script + ["--adapters", *adapters, "--max-loras", "8", "--out", str(results / "vllm_8_all_cores.json")],
        env=all_cores)
    run(script + ["--enable-lora", "--out", str(results / "vllm_base_lora_enabled.json")])
    run(script + ["--out", str(results / "vllm_base.json")])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    ap.add_argument("--results", type=Path, default=Path("results"), help="parts write into <results>/<cpu class>")
    ap.add_argument("--report-dir", type=Path, default=None, help="where REPORT.md goes (default: --results)")
    args = ap.parse_args()
    py = sys.executable
    results = (args.results / class_slug()).resolve()
    results.mkdir(parents=True, exist_ok=True)
    os.environ["LORAPLEX_RESULTS"] = str(results)  # every part started below writes there (benchmarks.common)
    print(f"CPU: {cpu().describe()}; {resolve_dtype().describe()}; results in {results}", flush=True)
    model_dir = default_model_dir()
    root = (args.results / "adapters").resolve()
    make_adapters(model_dir, root, 256)  # PEFT-made, r=16 on q,k,v,o; shared by every part
    t0 = time.perf_counter()
    if "offline" not in args.skip:
        run([py, "-m", "benchmarks.offline", "--adapters", str(root)])
    if "peers_hf" not in args.skip:
        run([py, "-m", "benchmarks.peers_hf", "--adapters", str(root)])
    if "vllm" not in args.skip:
        if not VLLM_PYTHON.exists():
            raise SystemExit(f"{VLLM_PYTHON} not found: run `make vllm-venv` first, or pass --skip vllm")
        from transformers import AutoTokenizer

        prompts_file = results / "prompts.json"
        prompts_file.write_text(json.dumps(workload_prompts(AutoTokenizer.from_pretrained(model_dir))))
        vllm_runs(model_dir, root, prompts_file, 64, results)
    if "llama_cpp" not in args.skip:
        run([py, "-m", "benchmarks.peers.llama_cpp", "--adapters", str(root)])
    if "http_peers" not in args.skip:
        run([py, "-m", "benchmarks.http_peers", "--adapters", str(root)]
            + ([] if VLLM_PYTHON.exists() else ["--skip", "vllm"]))
    if "lora_kernels" not in args.skip:
        run([py, "-m", "benchmarks.lora_kernels"])
    if "cold_load" not in args.skip:
        run([py, "-m", "benchmarks.adapter_cold_load"])
    if "serving" not in args.skip:
        run([py, "-m", "benchmarks.serving"])
    if "roofline" not in args.skip:
        run([py, "-m", "benchmarks.roofline"])
    if "quantized" not in args.skip:
        run([py, "-m", "benchmarks.quantized", "--adapters", str(root)])
    if "llama_cpp_gguf" not in args.skip:
        run([py, "-m", "benchmarks.peers.llama_cpp_gguf", "--adapters", str(root)])
    if "prefix_cache" not in args.skip:
        run([py, "-m", "benchmarks.prefix_cache", "--adapters", str(root)]
            + ([] if VLLM_PYTHON.exists() else ["--skip", "vllm"]))
    if "structured" not in args.skip:
        run([py, "-m", "benchmarks.structured", "--adapters", str(root)])
    if "fair_share" not in args.skip:
        run([py, "-m", "benchmarks.fair_share"])
    if "batch_invariance" not in args.skip:
        run([py, "-m", "benchmarks.batch_invariance", "--adapters", str(root)])
    if "cluster" not in args.skip:
        run([py, "-m", "benchmarks.cluster", "--adapters", str(root)])
    if "gpu" not in args.skip:
        import torch

        if torch.cuda.is_available():  # the GPU half (benchmarks/gpu.py); without a GPU the report says so
            run([py, "-m", "benchmarks.gpu"])
        else:
            (results / "gpu.json").unlink(missing_ok=True)
    print(f"\nsuite finished in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    run([py, "-m", "benchmarks.report", "--results", str(args.results), "--out", str(args.report_dir or args.results)])


if __name__ == "__main__":
    main()
