"""The whole benchmark suite in one run, loraplex and its peers on the same machine, then the report.

    make bench                                   # = .venv/bin/python -m benchmarks.run_all
    .venv/bin/python -m benchmarks.run_all [--skip vllm serving ...] [--report-dir docs/benchmarks]

Parts, in order, each its own process so none inherits another's threads or memory:
offline (loraplex 0/1/8/32 adapters + the 1..256 scaling sweep), peers_hf (transformers base, PEFT mixed
batch, sequential PEFT, set_adapter), vllm (vLLM CPU 0.32.0 from .venv-vllm: 1/8/32 adapters, base with
LoRA enabled (eager, as the mixed runs) and without (compiled)), lora_kernels (kernel profile, mapping
cost), cold_load, serving (Poisson/Zipf over HTTP), roofline, quantized (bf16 / NF4 / int8 base: memory
and throughput). Each writes results/<part>.json; the
report (benchmarks.report) turns them into REPORT.md and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, default_model_dir, make_adapters, workload_prompts

VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", ".venv-vllm")) / "bin" / "python"
PARTS = ["offline", "peers_hf", "vllm", "lora_kernels", "cold_load", "serving", "roofline", "quantized", "gpu"]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def vllm_runs(model_dir: Path, root: Path, prompts_file: Path, max_tokens: int) -> None:
    """vLLM CPU on the same prompts and adapters. With its defaults it binds one OpenMP thread on this 2-core
    machine (one core reserved); the 8-adapter run is repeated with both cores bound, and both are reported."""
    script = [str(VLLM_PYTHON), "benchmarks/peers/vllm_offline.py", "--model", str(model_dir),
              "--prompts-file", str(prompts_file), "--max-tokens", str(max_tokens), "--max-lora-rank", "16"]
    cores = os.cpu_count() or 1
    all_cores = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    for k in (1, 8, 32):
        adapters = [f"a{i}={root / f'a{i}'}" for i in range(k)]
        run(script + ["--adapters", *adapters, "--max-loras", str(k), "--out", str(RESULTS / f"vllm_{k}.json")])
    adapters = [f"a{i}={root / f'a{i}'}" for i in range(8)]
    run(script + ["--adapters", *adapters, "--max-loras", "8", "--out", str(RESULTS / "vllm_8_all_cores.json")],
        env=all_cores)
    run(script + ["--enable-lora", "--out", str(RESULTS / "vllm_base_lora_enabled.json")])
    run(script + ["--out", str(RESULTS / "vllm_base.json")])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    ap.add_argument("--report-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    py = sys.executable
    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir()
    root = (RESULTS / "adapters").resolve()
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

        prompts_file = RESULTS / "prompts.json"
        prompts_file.write_text(json.dumps(workload_prompts(AutoTokenizer.from_pretrained(model_dir))))
        vllm_runs(model_dir, root, prompts_file, 64)
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
    if "gpu" not in args.skip:
        import torch

        if torch.cuda.is_available():  # the GPU half (benchmarks/gpu.py); without a GPU the report says so
            run([py, "-m", "benchmarks.gpu"])
        else:
            (RESULTS / "gpu.json").unlink(missing_ok=True)
    print(f"\nsuite finished in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    run([py, "-m", "benchmarks.report", "--out", str(args.report_dir)])


if __name__ == "__main__":
    main()
