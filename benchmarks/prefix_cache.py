"""Prefix caching: shared system prompts and multi-turn chats, with the cache and without, loraplex and vLLM CPU.

    .venv/bin/python -m benchmarks.prefix_cache --adapters results/adapters [--skip vllm]

Two workloads over 8 tenants (adapters a0..a7), greedy, streamed /v1/completions of chat-templated text (rendered
here, so every server sees the same text):
- system prompts: each tenant has its own ~1,000-token system prompt; 64 requests, 8 per tenant with short user
  turns; 8 clients, one per tenant, each sending its tenant's requests one after another; 32 tokens each.
- chat: a 5-turn conversation per tenant (8 conversations at once) under another ~1,000-token system prompt of the
  tenant's (other text, so the two workloads share no block), each turn resending the whole conversation with the
  model's earlier answers; 48 tokens per turn.
Each server runs both, in that order, after one warm-up request per adapter that shares no prefix with them:
loraplex with and without --enable-prefix-caching, vLLM CPU (both cores bound, its faster set-up in
benchmarks.http_peers) with its prefix caching and LoRA on, and without.
Figures: TTFT p50/p99, output tokens/s over each workload, prompt tokens the server reports as cached
(usage.prompt_tokens_details.cached_tokens), and whether every answer with the cache equals the same server's
answer without it (greedy: caching must not change a token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import default_model_dir, machine, make_adapters, write_json
from benchmarks.serving import free_port, stop_server, summary, wait_healthy
from loraplex.hardware import resolve_dtype

VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", ".venv-vllm")) / "bin" / "python"
TENANTS = 8
WORDS = ("order delivery refund warranty invoice account customer address parcel return exchange battery screen "
         "charger cable shipping tracking discount voucher subscription payment card bank transfer store branch "
         "manager opening hours holiday weekend support ticket priority escalation policy contract").split()


@dataclass
class Answer:
    tenant: str
    sent: float
    first: float = 0.0
    done: float = 0.0
    text: str = ""
    tokens: int = 0
    cached: int | None = None  # prompt tokens the server says came from its cache
    error: str | None = None


def system_prompt(tenant: int, tokenizer: Any, tokens: int) -> str:
    """A tenant's own policy text of about `tokens` tokens (seeded: the same for every server)."""
    rng = random.Random(tenant)
    lines = [f"You are the assistant of shop number {tenant}. Follow these rules exactly."]
    while len(tokenizer.encode(" ".join(lines))) < tokens:
        words = " ".join(rng.choice(WORDS) for _ in range(12))
        lines.append(f"Rule {len(lines)}: about {words}.")
    return " ".join(lines)


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


async def ask(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Answer:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    a = Answer(model, time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                a.error = f"{r.status_code}: {(await r.aread()).decode()[:300]}"
                return a
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    a.error = line[6:300]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    a.first = a.first or time.perf_counter()
                    a.text += chunk["choices"][0]["text"]
                usage = chunk.get("usage")
                if usage:
                    a.tokens = int(usage["completion_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    a.cached = details.get("cached_tokens")
    except httpx.HTTPError as e:
        a.error = f"{type(e).__name__}: {e}"
    a.done = time.perf_counter()
    return a


async def system_prompts(url: str, tokenizer: Any, names: list[str], systems: list[str]) -> list[Answer]:
    async def client_of(i: int, client: httpx.AsyncClient) -> list[Answer]:
        out = []
        for k in range(8):
            msgs = [{"role": "system", "content": systems[i]},
                    {"role": "user", "content": f"Question {k}: can I {WORDS[(i + 3 * k) % len(WORDS)]} my order?"}]
            out.append(await ask(client, url, names[i], render(tokenizer, msgs), 32))
        return out

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), trust_env=False) as client:
        per = await asyncio.gather(*(client_of(i, client) for i in range(len(names))))
    return [a for answers in per for a in answers]


async def chats(url: str, tokenizer: Any, names: list[str], systems: list[str]) -> list[Answer]:
    async def chat(i: int, client: httpx.AsyncClient) -> list[Answer]:
        msgs = [{"role": "system", "content": systems[i]}]
        out = []
        for turn in range(5):
            msgs.append({"role": "user", "content": f"Turn {turn}: tell me more about the {WORDS[(i + turn) % len(WORDS)]}."})
            a = await ask(client, url, names[i], render(tokenizer, msgs), 48)
            out.append(a)
            msgs.append({"role": "assistant", "content": a.text})
        return out

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), trust_env=False) as client:
        per = await asyncio.gather(*(chat(i, client) for i in range(len(names))))
    return [a for answers in per for a in answers]


def figures(answers: list[Answer]) -> dict[str, Any]:
    ok = [a for a in answers if a.error is None and a.first]
    wall = max(a.done for a in answers) - min(a.sent for a in answers)
    cached = [a.cached for a in ok if a.cached is not None]
    return {"requests": len(answers), "completed": len(ok), "errors": [a.error for a in answers if a.error][:5],
            "tokens_per_s": sum(a.tokens for a in ok) / wall, "wall_s": wall,
            "ttft_ms": summary([a.first - a.sent for a in ok]),
            "cached_prompt_tokens": sum(cached) if cached else None}


def run_server(label: str, cmd: list[str], url: str, log: Path, tokenizer: Any, names: list[str],
               workloads: dict[str, list[str]], env: dict[str, str] | None = None) -> dict[str, Any]:
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    out: dict[str, Any] = {}
    try:
        wait_healthy(url, proc, log, timeout=600)

        async def warm() -> None:  # every adapter once, on a prompt sharing no block with the workloads
            async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), trust_env=False) as client:
                await asyncio.gather(*(ask(client, url, n, "Warm-up: count to three.", 4) for n in names))

        asyncio.run(warm())
        for name, run in (("system_prompts", system_prompts), ("chat", chats)):
            answers = asyncio.run(run(url, tokenizer, names, workloads[name]))
            out[name] = figures(answers)
            out[name]["answers"] = [a.text for a in answers]
            f = out[name]
            print(f"{label} {name}: {f['completed']}/{f['requests']}, {f['tokens_per_s']:.1f} tok/s, TTFT p50 "
                  f"{f['ttft_ms']['p50']:.0f} ms p99 {f['ttft_ms']['p99']:.0f} ms, cached prompt tokens "
                  f"{f['cached_prompt_tokens']}", flush=True)
    finally:
        stop_server(proc)
    return out


def compare(cached: dict[str, Any], uncached: dict[str, Any]) -> dict[str, Any]:
    """Per workload: TTFT p50 speed-up, throughput ratio, and answers equal to the uncached run's."""
    out = {}
    for w in ("system_prompts", "chat"):
        c, u = cached[w], uncached[w]
        same = sum(x == y for x, y in zip(c["answers"], u["answers"]))
        out[w] = {"ttft_p50_speedup": u["ttft_ms"]["p50"] / c["ttft_ms"]["p50"],
                  "throughput_ratio": c["tokens_per_s"] / u["tokens_per_s"],
                  "answers_equal": same, "answers": len(c["answers"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=Path, default=None, help="directory of PEFT adapters a0..a7 (made if absent)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["vllm"])
    args = ap.parse_args()
    choice = resolve_dtype("auto")
    model_dir = default_model_dir()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    workloads = {"system_prompts": [system_prompt(i, tok, 1000) for i in range(TENANTS)],
                 "chat": [system_prompt(100 + i, tok, 1000) for i in range(TENANTS)]}
    out: dict[str, Any] = {"machine": machine(), "dtype": choice.name, "tenants": TENANTS,
                           "system_prompt_tokens": [len(tok.encode(s)) for s in workloads["system_prompts"]]}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp) / "adapters"
        names = make_adapters(model_dir, root, TENANTS)
        log, port = Path(tmp) / "server.log", free_port()
        url = f"http://127.0.0.1:{port}"
        loraplex = [sys.executable, "-m", "loraplex.cli", "serve", "--adapter-dir", str(root), "--port", str(port),
                    "--max-loras", "8", "--max-model-len", "2048"]
        for label, flag in (("loraplex", "--enable-prefix-caching"), ("loraplex_no_cache", "--no-enable-prefix-caching")):
            out[label] = run_server(label, loraplex + [flag], url, log, tok, names, workloads)
        out["loraplex_vs_no_cache"] = compare(out["loraplex"], out["loraplex_no_cache"])
        if "vllm" not in args.skip and VLLM_PYTHON.exists():
            cores = os.cpu_count() or 1
            vllm = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--dtype", choice.name, "--enable-lora", "--max-loras", "8", "--max-lora-rank", "16",
                    "--max-model-len", "2048", "--port", str(port), "--host", "127.0.0.1", "--seed", "0",
                    "--enable-prompt-tokens-details", "--lora-modules", *[f"{n}={root / n}" for n in names]]
            env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
            for label, flag in (("vllm", "--enable-prefix-caching"), ("vllm_no_cache", "--no-enable-prefix-caching")):
                try:
                    out[label] = run_server(label, vllm + [flag], url, log, tok, names, workloads, env=env)
                except RuntimeError as e:  # its wheel may not start on this CPU: the report says so
                    out[label] = {"failed": str(e)[-2000:]}
            if "failed" not in out["vllm"] and "failed" not in out["vllm_no_cache"]:
                out["vllm_vs_no_cache"] = compare(out["vllm"], out["vllm_no_cache"])
                out["loraplex_vs_vllm"] = {
                    w: {"throughput_ratio": out["loraplex"][w]["tokens_per_s"] / out["vllm"][w]["tokens_per_s"],
                        "ttft_p50_ratio": out["vllm"][w]["ttft_ms"]["p50"] / out["loraplex"][w]["ttft_ms"]["p50"],
                        "answers_equal_to_loraplex": sum(
                            x == y for x, y in zip(out["vllm"][w]["answers"], out["loraplex_no_cache"][w]["answers"]))}
                    for w in ("system_prompts", "chat")}
    print(json.dumps({k: v for k, v in out.items() if k.endswith(("vs_no_cache", "vs_vllm"))}, indent=1))
    print(f"written to {write_json('prefix_cache', out)}")


if __name__ == "__main__":
    main()
