"""Turn the suite's results/<cpu class>/*.json into REPORT.md and PNG plots: a section per CPU class measured, every
figure with its ratio to ours, and the targets per class side by side.

    .venv/bin/python -m benchmarks.report [--results results] [--out results]

Each class's figures come from one run of `make bench` on one machine (ratios are only taken within a run). Parts
that were skipped are left out and said to be missing; nothing is filled in.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report_cluster import cluster_lines, cluster_targets
from benchmarks.report_batch_invariance import batch_invariance_lines, batch_invariance_targets
from benchmarks.report_fair_share import fair_share_lines, fair_share_targets
from benchmarks.report_quantized import gguf_peer_lines, gguf_peer_targets, quantized_lines, quantized_targets

PARTS = ["offline", "peers_hf", "llama_cpp", "http_peers", "lora_kernels", "adapter_cold_load", "serving", "roofline",
         "quantized", "llama_cpp_gguf", "prefix_cache", "structured", "fair_share", "batch_invariance", "cluster",
         "gpu"]
VLLM_RUNS = ("1", "8", "32", "8_all_cores", "base_lora_enabled", "base")
# Sections in this order; classes not listed come after, by name.
CLASS_ORDER = ["avx512-bf16", "amx-bf16", "avx512", "avx2"]


def tps(d: dict[str, Any] | None) -> float | None:
    return None if d is None else float(d["tokens_per_s"])


def fmt(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else ours / theirs


def times(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def verdict(value: float | None, target: float, higher: bool = True) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= target if higher else value <= target) else "**not met**"


@dataclass
class Run:
    """One CPU class's results: one run of the suite on one machine."""

    slug: str
    parts: dict[str, dict[str, Any]]
    vllm: dict[str, dict[str, Any]]
    folder: Path

    @classmethod
    def load(cls, folder: Path) -> Run:
        def read(name: str) -> dict[str, Any] | None:
            path = folder / f"{name}.json"
            return json.loads(path.read_text()) if path.is_file() else None

        parts = {p: d for p in PARTS if (d := read(p)) is not None}
        vllm = {k: d for k in VLLM_RUNS if (d := read(f"vllm_{k}")) is not None}
        return cls(folder.name, parts, vllm, folder)

    @property
    def machine(self) -> dict[str, Any]:
        return next(d["machine"] for d in self.parts.values() if "machine" in d)

    @property
    def label(self) -> str:
        m = self.machine
        return f"{m.get('cpu_class', self.slug)}, {m.get('dtype', '?')}"

    def ours(self, k: str) -> float | None:
        off = self.parts.get("offline")
        return tps(off["offline"].get(k)) if off else None

    def peft(self, k: str) -> float | None:
        p = self.parts.get("peers_hf")
        return tps(p["peft_mixed"].get(k)) if p else None

    def vllm8(self) -> float | None:
        """vLLM CPU's better 8-adapter figure: its default threading or both cores bound."""
        vals = [tps(self.vllm.get(k)) for k in ("8", "8_all_cores")]
        return max((v for v in vals if v is not None), default=None)

    def http(self, system: str) -> float | None:
        h = self.parts.get("http_peers")
        if h is None:
            return None
        if system == "vllm":
            vals = [tps(h.get(k)) for k in ("vllm", "vllm_all_cores")]
            return max((v for v in vals if v is not None), default=None)
        return tps(h.get(system))

    def llama(self, k: str) -> float | None:
        lc = self.parts.get("llama_cpp")
        return tps(lc.get(k)) if lc else None

    def roof_base32(self) -> float | None:
        roof = self.parts.get("roofline")
        row = next((r for r in roof["decode"] if r["adapters"] == 0 and r["batch"] == 32), None) if roof else None
        return row["fraction_of_peak"] if row else None

    def targets(self) -> list[tuple[str, float | None, str, str]]:
        """(target, measured, wanted, verdict) for this class."""
        base, a8, a32 = self.ours("base"), self.ours("8"), self.ours("32")
        transformers = tps(self.parts["peers_hf"]["transformers_base"]) if "peers_hf" in self.parts else None
        off = self.parts.get("offline")
        sc = off["scaling"]["points"] if off else {}
        scale = ratio(tps(sc.get("256")), tps(sc.get("8")))
        kernels, cold = self.parts.get("lora_kernels"), self.parts.get("adapter_cold_load")
        mapping_ms = kernels["mapping_us_batch64"]["64"] / 1e3 if kernels else None
        rows = [
            ("8 mixed adapters vs vLLM CPU, offline", ratio(a8, self.vllm8()), "≥ 3×", 3.0, True),
            ("8 mixed adapters vs vLLM CPU, over HTTP (64 streams)", ratio(self.http("loraplex"), self.http("vllm")),
             "≥ 3×", 3.0, True),
            ("8 mixed adapters vs PEFT mixed batch", ratio(a8, self.peft("8")), "≥ 1.8×", 1.8, True),
            ("8 mixed adapters vs llama.cpp", ratio(a8, self.llama("8")), "≥ 3×", 3.0, True),
            ("base only vs llama.cpp (same weight precision)", ratio(base, self.llama("base")), "≥ 1.0×", 1.0, True),
            ("base only vs transformers", ratio(base, transformers), "≥ 1.2×", 1.2, True),
            ("LoRA tax: 8 mixed / base", ratio(a8, base), "≥ 0.90", 0.9, True),
            ("LoRA tax: 32 distinct / base", ratio(a32, base), "≥ 0.80", 0.8, True),
            ("256 / 8 distinct adapters in the stream", scale, "≥ 0.70", 0.7, True),
            ("base decode at batch 32, fraction of GEMM peak", self.roof_base32(), "≥ 0.40", 0.4, True),
            ("adapter mapping per step, batch 64 (ms)", mapping_ms, "≤ 0.1", 0.1, False),
            ("cold load p50 (ms)", cold["cold_load_ms"]["p50"] if cold else None, "≤ 20", 20.0, False),
            ("decode during a cold-load burst / none", cold["ratio"] if cold else None, "≥ 0.90", 0.9, True),
        ]
        so = self.parts.get("structured")
        if so:
            rows.append(("batch 32, half under a JSON schema / none", so["ratio"], "≥ 0.90", 0.9, True))
        pc = self.parts.get("prefix_cache")
        if pc:
            for w, label in (("system_prompts", "shared system prompts"), ("chat", "5-turn chats")):
                v = pc["loraplex_vs_no_cache"][w]
                rows += [(f"prefix cache, {label}: TTFT p50 without / with", v["ttft_p50_speedup"], "≥ 5×", 5.0, True),
                         (f"prefix cache, {label}: throughput with / without", v["throughput_ratio"], "≥ 2×", 2.0, True)]
        rows += fair_share_targets(self.parts.get("fair_share"))  # "not measured" where the part did not run
        rows += batch_invariance_targets(self.parts.get("batch_invariance"))
        rows += quantized_targets(self.parts.get("quantized"))
        rows += gguf_peer_targets(self.parts.get("llama_cpp_gguf"))
        rows += cluster_targets(self.parts.get("cluster"))
        return [(name, value, wanted, verdict(value, target, higher)) for name, value, wanted, target, higher in rows]


def plot_offline(out: Path, run: Run, rows: dict[str, dict[str, float | None]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    systems = [s for s in next(iter(rows.values())) if any(r.get(s) for r in rows.values())]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        vals = [rows[label].get(system) or 0.0 for label in labels]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=system)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Offline throughput, 32 requests x 64 tokens, greedy ({run.label})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{run.slug}/offline_throughput.png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def plot_scaling(out: Path, run: Run, points: dict[str, dict[str, float]]) -> str:
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in points)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ks, [points[str(k)]["tokens_per_s"] for k in ks], marker="o", label="loraplex")
    if "8" in points:
        ax.axhline(0.7 * points["8"]["tokens_per_s"], ls="--", c="gray", label="0.7 x the 8-adapter figure")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the request stream")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Scaling: 256 requests x 32 tokens, 32 device slots ({run.label})")
    ax.legend()
    fig.tight_layout()
    name = f"{run.slug}/scaling.png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def plot_kernels(out: Path, run: Run, rows: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    shown = [("qkv_proj", t) for t in sorted({r["tokens"] for r in rows})]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6), squeeze=False)
    for ax, (layer, t) in zip(axes[0], shown):
        sel = [r for r in rows if r["layer"] == layer and r["tokens"] == t]
        ks = [r["adapters"] for r in sel]
        if all("masked_us" in r for r in sel):  # runs before the masked kernel was retired
            ax.plot(ks, [r["masked_us"] for r in sel], marker="o", label="masked (torch)")
        ax.plot(ks, [r["grouped_us"] for r in sel], marker="s", label="grouped (torch)")
        if all("fused_us" in r for r in sel):
            ax.plot(ks, [r["fused_us"] for r in sel], marker="^", label="fused (C++)")
        ax.axhline(sel[0]["base_us"], ls="--", c="gray", label="base GEMM")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{layer}, T={t}")
        ax.set_xlabel("distinct adapters")
    axes[0][0].set_ylabel(f"us per call ({run.label})")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    name = f"{run.slug}/lora_kernels.png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def offline_rows(run: Run) -> dict[str, dict[str, float | None]]:
    p = run.parts.get("peers_hf")
    return {
        "base only": {"loraplex": run.ours("base"), "vLLM CPU": tps(run.vllm.get("base_lora_enabled")),
                      "vLLM CPU (no LoRA, compiled)": tps(run.vllm.get("base")), "llama.cpp": run.llama("base"),
                      "transformers / PEFT batch": tps(p["transformers_base"]) if p else None, "sequential PEFT": None},
        **{f"{k} adapter{'s' if k != '1' else ''}": {
            "loraplex": run.ours(k), "vLLM CPU": tps(run.vllm.get(k)), "vLLM CPU (no LoRA, compiled)": None,
            "llama.cpp": run.llama(k), "transformers / PEFT batch": run.peft(k),
            "sequential PEFT": tps(p["peft_sequential"]) if p and k == "8" else None} for k in ("1", "8", "32")},
    }


def class_section(run: Run, out: Path) -> list[str]:
    m, P = run.machine, run.parts
    vllm_version = next((d["version"] for d in run.vllm.values()), None)
    lc = P.get("llama_cpp")
    lines = [f"## {run.label}", "",
             f"Machine: {m.get('cpu_description', m['cpu'])}, {m['cores']} cores; ISA flags {', '.join(m.get('isa_flags', []))}; "
             f"dtype `auto` -> {m.get('dtype', '?')}; torch {m['torch']} ({m['torch_threads']} threads), transformers "
             f"{m['transformers']}, Python {m['python']}" + (f"; PEFT {P['peers_hf']['peft']}" if "peers_hf" in P else "")
             + (f"; vLLM CPU {vllm_version}" if vllm_version else "") + (f"; llama.cpp {lc['version']}" if lc else "") + ".",
             "Every system in this section ran in the dtype above (llama.cpp: GGUF weights and KV cache at that "
             "precision), from one run of `make bench` on this machine."]
    provenance = run.folder / "provenance.md"
    if provenance.is_file():  # how this class's figures were produced, when not by one plain `make bench`
        lines += ["", provenance.read_text().strip()]
    missing = [p for p in ("offline", "peers_hf", "llama_cpp", "http_peers", "lora_kernels", "adapter_cold_load",
                           "serving", "roofline") if p not in P] + ([] if run.vllm else ["vllm"])
    if missing:
        lines += ["", f"Parts not run: {', '.join(missing)}."]
    if "capped by" in m.get("cpu_description", ""):
        lines += ["", "This class was measured on an AVX-512 machine with torch, oneDNN and MKL capped to AVX2 "
                  "(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`); loraplex's C++ "
                  "kernels and llama.cpp were built for AVX2 (`-mno-avx512f`, `GGML_AVX512=OFF`). vLLM CPU's own "
                  "compiled kernels are not capped by these settings. A real AVX2-only CPU (Zen 2/3) has lower "
                  "clocks and memory bandwidth: its absolute figures are lower, the ratios are what this section "
                  "is for."]
    rows = offline_rows(run)
    systems = list(next(iter(rows.values())))
    lines += ["", "### Offline throughput (tokens/s, 32 requests x 64 new tokens)", "",
              "| workload | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for label, r in rows.items():
        cells = [fmt(r["loraplex"])] + [f"{fmt(v)} ({times(ratio(r['loraplex'], v))})" if v is not None else "—"
                                        for s, v in r.items() if s != "loraplex"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "In parentheses: loraplex's figure divided by the peer's. vLLM CPU with LoRA enabled runs eager; "
              "without LoRA it runs torch.compiled (a separate column). llama.cpp: `llama-server`, one slot per "
              "request, continuous batching, each request's adapter in its `lora` field. The sequential PEFT "
              "figure is one request at a time, `set_adapter` then `generate`, over 8 adapters."]
    if "8" in run.vllm and "8_all_cores" in run.vllm:
        lines += [f"vLLM CPU binds one OpenMP thread on this 2-core machine by default (a core is reserved); with both "
                  f"cores bound its 8-adapter figure was {fmt(tps(run.vllm['8_all_cores']))} tok/s against "
                  f"{fmt(tps(run.vllm['8']))}; the ratios in the targets use the better of the two."]
    if lc:
        lines += [f"llama.cpp does not batch requests whose LoRA settings differ (its server's documentation says "
                  f"so): with 8 adapters mixed it made {fmt(run.llama('8'))} tok/s against {fmt(run.llama('base'))} "
                  f"for the base model alone ({times(ratio(run.llama('8'), run.llama('base')))}); loraplex kept "
                  f"{times(ratio(run.ours('8'), run.ours('base')))} of its base figure."
                  + ("" if lc.get("adapter_changes_output", True) else " (Its adapters did not change the output: "
                     "the figure is suspect.)")]
    h = P.get("http_peers")
    if h:
        lines += ["", f"### Over HTTP: {h['streams']} concurrent streams over 8 adapters", "",
                  f"{h['streams']} streaming completions sent at once (one per client), request i on adapter i % 8, "
                  f"{h['max_tokens']} tokens each, greedy, EOS ignored; each system as its own OpenAI-compatible "
                  "server on this machine.", "",
                  "| server | tok/s | loraplex / it | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | errors |",
                  "|---|---|---|---|---|---|---|"]
        for key, name in (("loraplex", "loraplex"), ("vllm", "vLLM CPU (default threads)"),
                          ("vllm_all_cores", "vLLM CPU (both cores bound)"), ("llama_cpp", "llama.cpp")):
            if key in h:
                r = h[key]
                lines.append(f"| {name} | {fmt(r['tokens_per_s'])} | {times(ratio(tps(h['loraplex']), tps(r)))} | "
                             f"{fmt(r['ttft_ms']['p50'])} | {fmt(r['ttft_ms']['p99'])} | {fmt(r['tpot_ms']['p50'], 1)} "
                             f"| {r['errors']} |")
    plots = []
    if any(v is not None for r in rows.values() for v in r.values()):
        plots.append(plot_offline(out, run, rows))
        lines += ["", f"![offline]({plots[-1]})"]

    if "serving" in P:
        s = P["serving"]
        lines += ["", "### Serving over HTTP (Poisson arrivals, Zipf popularity over 64 adapters)", "",
                  f"{s['requests']} streaming completions at {s['rate']} req/s, {s['max_tokens']} tokens each, "
                  f"{s['distinct_adapters']} distinct adapters used, {s['errors']} errors.", "",
                  "| | p50 | p99 | mean |", "|---|---|---|---|",
                  f"| time to first token (ms) | {fmt(s['ttft_ms']['p50'], 1)} | {fmt(s['ttft_ms']['p99'], 1)} | {fmt(s['ttft_ms']['mean'], 1)} |",
                  f"| time per output token (ms) | {fmt(s['tpot_ms']['p50'], 1)} | {fmt(s['tpot_ms']['p99'], 1)} | {fmt(s['tpot_ms']['mean'], 1)} |",
                  "", f"Throughput: {fmt(s['tokens_per_s'])} tokens/s, {fmt(s['requests_per_s'], 2)} requests/s."]
    if "adapter_cold_load" in P:
        c = P["adapter_cold_load"]
        lines += ["", "### Cold adapter loads", "",
                  f"A {c['adapter_mb']} MB adapter from disk (page cache warm) into a device slot: p50 "
                  f"{fmt(c['cold_load_ms']['p50'], 1)} ms, p99 {fmt(c['cold_load_ms']['p99'], 1)} ms over "
                  f"{c['cold_load_ms']['n']} loads. Decode throughput with a burst of {c['burst']} cold loads: "
                  f"{fmt(c['tokens_per_s_with_cold_loads'])} tok/s against {fmt(c['tokens_per_s_no_loads'])} with the "
                  f"burst's adapters resident ({fmt(c['ratio'], 2)})."]
    if "lora_kernels" in P:
        k = P["lora_kernels"]
        mp = k["mapping_us_batch64"]
        pe = P.get("peers_hf")
        plots.append(plot_kernels(out, run, k["kernels"]))
        lines += ["", "### Switching cost and the LoRA kernels", "",
                  "Building a step's adapter mapping for a batch of 64 decode tokens: " +
                  ", ".join(f"{fmt(v, 1)} µs with {n} distinct adapter{'s' if n != '1' else ''}" for n, v in mp.items()) + "."
                  + (f" PEFT's `set_adapter`, measured in the same run: {pe['peft_set_adapter_ms']:.3f} ms per call; the "
                     "sequential pattern pays it per request, loraplex pays the mapping once per step for every "
                     "adapter in it." if pe else ""),
                  "", f"Kernel profile (µs per call, {k.get('dtype', '?')}): the fused C++ kernel (`lora/csrc/lora_cpu.cpp`) "
                  "against the torch fallback, a grouped (SGMV-style) bmm; the base layer's own GEMM for scale.", "", f"![kernels]({plots[-1]})"]
    sc = P["offline"]["scaling"]["points"] if "offline" in P else {}
    if sc:
        plots.append(plot_scaling(out, run, sc))
        ks = sorted(sc, key=int)
        lines += ["", "### Scaling with distinct adapters", "", "| distinct adapters | " + " | ".join(ks) + " |",
                  "|---|" + "---|" * len(ks), "| tokens/s | " + " | ".join(fmt(sc[x]["tokens_per_s"]) for x in ks) + " |",
                  "", f"![scaling]({plots[-1]})"]
    if "roofline" in P:
        lines += roofline_lines(P["roofline"])
    if "quantized" in P:
        lines += quantized_lines(P["quantized"])
    if "llama_cpp_gguf" in P:
        lines += gguf_peer_lines(P["llama_cpp_gguf"])
    if "prefix_cache" in P:
        lines += prefix_cache_lines(P["prefix_cache"])
    if "structured" in P:
        so = P["structured"]
        lines += ["", "### Structured outputs", "",
                  f"Batch {so['batch']} over {so['adapters']} adapters, {so['max_tokens']} tokens each: "
                  f"{fmt(so['no_schema']['tokens_per_s'])} tok/s with no schema, {fmt(so['half_schema']['tokens_per_s'])} "
                  f"with half the requests under a JSON schema ({fmt(so['ratio'], 2)}); the masks are computed by "
                  f"llguidance on a worker thread while the forward pass runs. Compiling a form-like JSON schema: p50 "
                  f"{fmt(so['compile_ms']['p50'], 1)} ms, p99 {fmt(so['compile_ms']['p99'], 1)} ms over "
                  f"{so['compile_ms']['n']} schemas (cached per schema after that); the tokenizer's one-time set-up "
                  f"{fmt(so['tokenizer_setup_ms'])} ms."]
    if "fair_share" in P:
        lines += fair_share_lines(P["fair_share"])
    if "batch_invariance" in P:
        lines += batch_invariance_lines(P["batch_invariance"])
    if "cluster" in P:
        lines += cluster_lines(P["cluster"])
    lines += ["", "### Targets", "", "| target | measured | wanted | |", "|---|---|---|---|"]
    lines += [f"| {name} | {fmt(v, 2)} | {wanted} | {verdict_} |" for name, v, wanted, verdict_ in run.targets()]
    return lines


def prefix_cache_lines(pc: dict[str, Any]) -> list[str]:
    """benchmarks/prefix_cache.py: each server with its prefix cache and without, two workloads."""
    sys_tokens = pc["system_prompt_tokens"]
    lines = ["", "### Prefix caching: shared system prompts and multi-turn chats", "",
             f"{pc['tenants']} tenants, one adapter each. *System prompts*: each tenant's own system prompt of "
             f"{min(sys_tokens)}-{max(sys_tokens)} tokens, 64 requests (8 per tenant, one client per tenant sending "
             "them one after another), 32 tokens each. *Chat*: a 5-turn conversation per tenant (8 at once) under another "
             "system prompt of the same length, each turn resending the conversation with the model's earlier "
             "answers, 48 tokens per turn. Greedy; every server "
             "got the same text. *Cached tokens*: prompt tokens the server reported as served from its cache. "
             "*Same answers*: answers with the cache equal to the same server's answers without it.", "",
             "| server | workload | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | cached tokens | with / without: TTFT p50 | "
             "throughput | same answers |", "|---|---|---|---|---|---|---|---|---|"]
    for key, name in (("loraplex", "loraplex"), ("vllm", "vLLM CPU")):
        r, base = pc.get(key), pc.get(f"{key}_no_cache")
        if r is None or base is None:
            continue
        if "failed" in r or "failed" in base:
            lines.append(f"| {name} | — | did not run: {(r.get('failed') or base.get('failed', ''))[-200:]!r} | | | | | | |")
            continue
        vs = pc[f"{key}_vs_no_cache"]
        for w in ("system_prompts", "chat"):
            c, u = r[w], base[w]
            lines.append(f"| {name} | {w.replace('_', ' ')} | {fmt(c['tokens_per_s'])} (without: {fmt(u['tokens_per_s'])}) | "
                         f"{fmt(c['ttft_ms']['p50'])} (without: {fmt(u['ttft_ms']['p50'])}) | {fmt(c['ttft_ms']['p99'])} | "
                         f"{c['cached_prompt_tokens'] if c['cached_prompt_tokens'] is not None else '—'} | "
                         f"{times(vs[w]['ttft_p50_speedup'])} | {times(vs[w]['throughput_ratio'])} | "
                         f"{vs[w]['answers_equal']}/{vs[w]['answers']} |")
    if "vllm" not in pc:
        lines += ["", "vLLM CPU was not run in this part for this class (`--skip vllm`)."]
    lv = pc.get("loraplex_vs_vllm")
    if lv:
        lines += ["", "loraplex with its cache against vLLM CPU with its cache: " + "; ".join(
            f"{w.replace('_', ' ')}: {times(v['throughput_ratio'])} the throughput, TTFT p50 {times(v['ttft_p50_ratio'])} "
            f"lower, {v['answers_equal_to_loraplex']} of vLLM's answers equal to loraplex's uncached ones"
            for w, v in lv.items()) + "."]
    return lines


def roofline_lines(roof: dict[str, Any]) -> list[str]:
    dtype = roof.get("dtype", "bfloat16")
    peak = roof.get("peak_gflops", roof.get("peak_gflops_bf16"))
    lines = ["", "### Roofline", "",
             f"Measured peaks: {dtype} GEMM {fmt(peak)} GFLOP/s (2048³, the better of MKL and oneDNN's prepacked "
             f"GEMM), copy bandwidth {fmt(roof['copy_bandwidth_gbs'], 1)} GB/s.", "",
             "| adapters | batch | ms/step | tok/s | GFLOP/s | of peak | GB/s (weights + KV) | of bandwidth |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['adapters']} | {r['batch']} | {fmt(r['step_ms'], 1)} ({fmt(r['gemm_ms'], 1)} in base GEMMs) | "
              f"{fmt(r['tokens_per_s'])} | {fmt(r['gflops'])} | {100 * r['fraction_of_peak']:.0f}% | {fmt(r['gb_per_s'], 1)} | "
              f"{100 * r['fraction_of_bandwidth']:.0f}% |" for r in roof["decode"]]
    share = ", ".join(f"{100 * r['gemm_ms'] / r['step_ms']:.0f}% at batch {r['batch']}" for r in roof["decode"]
                      if r["adapters"] == 0)
    lines += ["", "The base model's GEMMs alone (every linear layer and the LM head timed on their own at the step's "
              f"shape) take this share of a base decode step: {share}. The rest is attention over the paged KV cache "
              "(a C++ kernel for decode), norms, RoPE, activations, sampling and the LoRA kernels."]
    per, base_b = roof["lora_bytes_per_adapter"], roof["base_weight_bytes"]
    r0 = next((r for r in roof["decode"] if r["adapters"] == 0 and r["batch"] == 32), None)
    r8 = next((r for r in roof["decode"] if r["adapters"] > 0 and r["batch"] == 32), None)
    lines += ["", "What the LoRA tax is made of: a decode step reads every active adapter's A and B in every layer, "
              f"{per / 1e6:.1f} MB per rank-16 q,k,v,o adapter in {dtype}, against {base_b / 1e6:.0f} MB of base weights: "
              f"+{100 * 8 * per / base_b:.0f}% bytes with 8 distinct adapters, +{100 * 32 * per / base_b:.0f}% with 32."]
    if r0 and r8:
        lines += [f"At batch 32, {r8['adapters']} adapters added {r8['step_ms'] - r0['step_ms']:.1f} ms to a "
                  f"{r0['step_ms']:.1f} ms step."]
    return lines


def gpu_lines(runs: list[Run]) -> list[str]:
    gpu = next((r.parts["gpu"] for r in runs if "gpu" in r.parts and r.parts["gpu"]["device"].startswith("cuda")), None)
    lines = ["", "## On a GPU", ""]
    if gpu is None:
        return lines + ["No GPU was available to these runs. `benchmarks/gpu.py` measures the GPU half (Llama 1B-8B "
                        "shape, random weights, Triton kernels, against PEFT's mixed batch) where one is; the Triton "
                        "kernels are tested on the CPU in Triton's interpreter against the torch reference "
                        "(tests/test_lora_triton.py)."]
    o, n = gpu["loraplex"], str(gpu["adapters"])
    lines += [f"Device: {gpu['machine'].get('gpu', gpu['device'])}. Model: Llama architecture, {gpu['shape']} shape "
              f"({gpu['shape_config']}), **random weights** ({gpu['weights']}): speed figures only. {gpu['requests']} "
              f"requests x {gpu['max_tokens']} tokens, rank-16 q,k,v,o adapters, Triton multi-LoRA kernels.", "",
              "| system | tok/s |", "|---|---|", f"| loraplex, base only | {fmt(o['base']['tokens_per_s'])} |",
              f"| loraplex, {n} adapters | {fmt(o[n]['tokens_per_s'])} |"]
    if "peft_mixed" in gpu:
        lines.append(f"| PEFT mixed batch, {n} adapters | {fmt(gpu['peft_mixed']['tokens_per_s'])} |")
    lines += ["", f"LoRA tax: {100 * gpu['lora_tax']:.1f}% (target <= 15% with 32 adapters in a batch of 64)"
              + (f"; {gpu['vs_peft']:.2f}x PEFT's mixed batch (target >= 5x)." if "vs_peft" in gpu else ".")]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=Path("results"), help="holds one folder per CPU class")
    ap.add_argument("--out", type=Path, default=None, help="where REPORT.md, the plots and the JSON go (default: --results)")
    args = ap.parse_args()
    out: Path = args.out or args.results
    folders = [f for f in args.results.iterdir() if f.is_dir() and any(f.glob("*.json"))]
    folders.sort(key=lambda f: (CLASS_ORDER.index(f.name) if f.name in CLASS_ORDER else len(CLASS_ORDER), f.name))
    runs = [r for r in (Run.load(f) for f in folders) if r.parts]
    if not runs:
        raise SystemExit(f"no results under {args.results}/<cpu class>: run `make bench` first")
    for run in runs:
        (out / run.slug).mkdir(parents=True, exist_ok=True)
    lines = ["# loraplex benchmark report", "",
             "One section per CPU class the suite has run on; within a section every figure comes from one run of "
             "`make bench` on one machine, loraplex and its peers on the same model (the embedded SmolLM2-135M-Instruct), "
             "prompts and PEFT-made adapters (rank 16 on q, k, v, o), greedy, EOS ignored, in the dtype loraplex "
             "resolves there (`loraplex.hardware`: bf16 where the CPU multiplies it natively, else fp32). Compare "
             "ratios within a section, not absolute figures across sections.", "",
             "## Targets by CPU class", "", "| target | wanted | " + " | ".join(r.label for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    per_class = [r.targets() for r in runs]
    for i, (name, _, wanted, _) in enumerate(per_class[0]):
        cells = [f"{fmt(t[i][1], 2)} ({t[i][3]})" for t in per_class]
        lines.append(f"| {name} | {wanted} | " + " | ".join(cells) + " |")
    for run in runs:
        lines += [""] + class_section(run, out)
    lines += gpu_lines(runs)
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    if out.resolve() != args.results.resolve():
        for run in runs:
            for f in [*(args.results / run.slug).glob("*.json"), args.results / run.slug / "provenance.md"]:
                if f.name != "prompts.json" and f.is_file():
                    shutil.copy(f, out / run.slug / f.name)
    print(f"report: {out / 'REPORT.md'} ({len(runs)} CPU class{'es' if len(runs) > 1 else ''})")


if __name__ == "__main__":
    main()
