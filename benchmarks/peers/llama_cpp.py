"""llama.cpp's `llama-server` as a peer, on the shared offline workload: base model only and 8 adapters mixed.

    .venv/bin/python -m benchmarks.peers.llama_cpp --adapters results/adapters [--dtype auto]

The default model and the benchmark's PEFT adapters are converted to GGUF with llama.cpp's own converters
(convert_hf_to_gguf.py, convert_lora_to_gguf.py, from the same source tree as the server), at the weight precision
loraplex runs at on this machine (`--dtype auto`: f32 on AVX2, bf16 on AVX512-BF16; the KV cache likewise).
The server gets both cores (-t/-tb = cores), one slot per request (-np 32) with continuous batching, every
adapter loaded at start with scale 0 (--lora-init-without-apply); each request names its adapter in its own
`lora` field. All 32 requests are sent at once, greedy, EOS ignored, 64 tokens each, as for loraplex.
llama.cpp does not batch requests whose LoRA settings differ (its server README says so); the figure is what
that costs here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (default_model_dir, machine, make_adapters, round_robin, warmup, workload_prompts,
                               write_json)
from benchmarks.peers.llama_cpp_build import ROOT, VERSION, build, fetch
from loraplex.hardware import resolve_dtype

OUTTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _converter_env() -> tuple[Path, dict[str, str]]:
    src = fetch()
    return src, {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}", "NO_LOCAL_GGUF": ""}


def convert_base(model_dir: Path, outtype: str) -> Path:
    """The base model as a GGUF file of `outtype` (f32, bf16, q8_0, ...), made once under .llama.cpp/gguf."""
    src, env = _converter_env()
    base = ROOT / "gguf" / outtype / "base.gguf"
    base.parent.mkdir(parents=True, exist_ok=True)
    if not base.is_file():
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                        "--outfile", str(base)], check=True, env=env, cwd=src)
    return base


def convert_loras(model_dir: Path, adapters: list[Path], outtype: str) -> list[Path]:
    """The PEFT adapters as GGUF LoRA files of `outtype`, made once under .llama.cpp/gguf."""
    src, env = _converter_env()
    out = ROOT / "gguf" / outtype
    out.mkdir(parents=True, exist_ok=True)
    loras = []
    for a in adapters:
        path = out / f"{a.name}.gguf"
        if not path.is_file():
            subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), str(a), "--base", str(model_dir),
                            "--outtype", outtype, "--outfile", str(path)], check=True, env=env, cwd=src)
        loras.append(path)
    return loras


def convert(model_dir: Path, adapters: list[Path], outtype: str) -> tuple[Path, list[Path]]:
    """GGUF files of the base model and the adapters at one precision (made once, under .llama.cpp/gguf)."""
    return convert_base(model_dir, outtype), convert_loras(model_dir, adapters, outtype)


class Server:
    """llama-server on a free port, started and stopped with the context."""

    def __init__(self, model: Path, loras: list[Path], parallel: int, ctx_per_slot: int, cache_type: str) -> None:
        self.port = 18000 + os.getpid() % 1000
        threads = str(os.cpu_count() or 1)
        self.cmd = [str(build()), "-m", str(model), "--port", str(self.port), "--host", "127.0.0.1",
                    "-t", threads, "-tb", threads, "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
                    "-cb", "--no-cache-prompt", "-ctk", cache_type, "-ctv", cache_type, "--log-disable"]
        for lora in loras:
            self.cmd += ["--lora", str(lora)]
        if loras:
            self.cmd.append("--lora-init-without-apply")
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"llama-server exited ({self.proc.returncode}):\n{self.log.read().decode()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("llama-server did not become healthy within 300 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def complete(url: str, prompt: str, lora: int | None, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True,
                            "cache_prompt": False, "lora": [] if lora is None else [{"id": lora, "scale": 1.0}]}
    r = httpx.post(url + "/completion", json=body, timeout=1800)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def run_batch(url: str, prompts: list[str], loras: list[int | None], max_tokens: int) -> dict[str, float]:
    """All requests at once; tokens/s over the wall time from the first send to the last answer."""
    def one(i: int) -> int:
        return int(complete(url, prompts[i], loras[i], max_tokens)["tokens_predicted"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(one, range(len(prompts))))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=Path, default=None, help="directory of PEFT adapters a0..a7 (made if absent)")
    ap.add_argument("--dtype", default="auto", help="weight precision: what loraplex resolves (auto) or a dtype name")
    args = ap.parse_args()
    choice = resolve_dtype(args.dtype)
    outtype = OUTTYPE[choice.name]
    model_dir = default_model_dir()
    from transformers import AutoTokenizer

    prompts = workload_prompts(AutoTokenizer.from_pretrained(model_dir), args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(model_dir, root, 8)
        base, loras = convert(model_dir, [root / n for n in names], outtype)
        result: dict[str, Any] = {"machine": machine(), "version": f"b{VERSION.split('.')[0]}", "weights": outtype,
                                  "kv_cache": outtype, "requests": args.requests, "max_tokens": args.max_tokens}
        # Base only on a server without adapters: loaded at scale 0, they still run for a request that names none.
        with Server(base, [], args.requests, 192, outtype) as server:
            run_batch(server.url, warmup(prompts[:4]), [None] * 4, 4)  # warm-up
            result["base"] = run_batch(server.url, prompts, [None] * args.requests, args.max_tokens)
            print(f"llama.cpp ({outtype}), base only: {result['base']['tokens_per_s']:.1f} tok/s", flush=True)
        with Server(base, loras, args.requests, 192, outtype) as server:
            # The adapters really apply: adapter 0's greedy text differs from the base model's.
            plain, adapted = (complete(server.url, prompts[0], a, 16)["content"] for a in (None, 0))
            result["adapter_changes_output"] = plain != adapted
            ids = [int(n[1:]) for n in round_robin(names, args.requests)]
            run_batch(server.url, warmup(prompts[:8]), ids[:8], 4)  # warm-up: every adapter once
            result["8"] = run_batch(server.url, prompts, ids, args.max_tokens)  # type: ignore[arg-type]
            print(f"llama.cpp ({outtype}), 8 adapters mixed: {result['8']['tokens_per_s']:.1f} tok/s", flush=True)
    print(f"written to {write_json('llama_cpp', result)}")


if __name__ == "__main__":
    main()
