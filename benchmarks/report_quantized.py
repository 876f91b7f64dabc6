"""The report's section for benchmarks/quantized.py: memory and throughput of the dense, NF4 and int8 bases, decode
at batch 1, 8 and 32 with their ratios to the dense base, and issue 32's targets."""

from __future__ import annotations

from typing import Any

# Issue 32: quantized decode against the dense base, with 8 adapters mixed, at batch 1, 8 and 32.
TARGETS = {"nf4": (3.0, 1.5, 1.0), "int8": (2.0, 1.2, 1.0)}
BANDWIDTH_TARGET = 0.6  # issue 32: batch-1 decode on a quantized base reads its weights at >= 60% of the bandwidth
QUANTIZED = ("nf4", "int8", "gguf")


def _row(q: dict[str, Any] | None, base: str) -> dict[str, Any] | None:
    if q is None:
        return None
    return next((r for r in q["rows"] if r["quantization"].split("+")[0] == base), None)


def _ratio(q: dict[str, Any] | None, base: str, batch: int, kind: str = "8_adapters") -> float | None:
    ours, dense = _row(q, base), _row(q, "none")
    if not ours or not dense or "decode_tokens_per_s" not in ours or str(batch) not in ours["decode_tokens_per_s"]:
        return None
    return ours["decode_tokens_per_s"][str(batch)][kind] / dense["decode_tokens_per_s"][str(batch)][kind]


def _bandwidth(q: dict[str, Any] | None, base: str) -> tuple[float, float] | None:
    """(GB/s of weights read, fraction of the copy bandwidth) at batch 1, base only: the weights a decode step reads
    over the time of a token."""
    r = _row(q, base)
    if q is None or r is None or "step_weight_bytes" not in r or "1" not in r.get("decode_tokens_per_s", {}):
        return None
    gbs = r["step_weight_bytes"] * r["decode_tokens_per_s"]["1"]["base"] / 1e9
    return gbs, gbs / q["copy_bandwidth_gbs"]


def quantized_lines(q: dict[str, Any]) -> list[str]:
    m = q["machine"]
    plain = _row(q, "none")
    lines = ["", "### Quantized base: memory and throughput", "",
             f"Measured on {m.get('cpu_description', m.get('cpu', '?'))}. "
             f"{q['requests']} requests x {q['max_tokens']} tokens; memory from the engine's accounting (tensors "
             f"as held: codes, scales, packed copies). LoRA runs in the model dtype ({m.get('dtype', '?')}) on top "
             "of every base.", "",
             "| base | weights (MiB) | decoder linears (MiB) | vs unquantized | KV cache (MiB) | adapter slots (MiB) | "
             "tok/s base | tok/s 8 adapters |", "|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        shrink = f"{plain['linear_bytes'] / r['linear_bytes']:.2f}x smaller" if plain and r is not plain else "—"
        lines.append(f"| {r['quantization']} | {r['weights_bytes'] / 2**20:.1f} | {r['linear_bytes'] / 2**20:.1f} | "
                     f"{shrink} | {r['kv_cache_bytes'] / 2**20:.0f} | {r['adapter_slots_bytes'] / 2**20:.1f} | "
                     f"{r['tokens_per_s_base']:.0f} | {r['tokens_per_s_8_adapters']:.0f} |")
    batches = q.get("batches")
    if not batches:
        return lines
    lines += ["", f"Decode tokens per second (engine steps timed, median of {q['reps']} runs) and the ratio to the "
                  "dense base, base only / 8 adapters round-robin; at batch 1, the weights a step reads (the linears "
                  "and the LM head as held) over a token's time, against this machine's copy bandwidth "
                  f"({q['copy_bandwidth_gbs']:.1f} GB/s):" if "copy_bandwidth_gbs" in q else "", "",
              "| base | kernels | " + " | ".join(f"batch {b}" for b in batches) + " | batch 1: weights read |",
              "|---|---|" + "---|" * len(batches) + "---|"]
    for r in q["rows"]:
        base = r["quantization"].split("+")[0]
        cells = []
        for b in batches:
            d = r["decode_tokens_per_s"][str(b)]
            ratio = "" if base == "none" else (f" ({_ratio(q, base, b, 'base'):.2f}x / "
                                               f"{_ratio(q, base, b):.2f}x)")
            cells.append(f"{d['base']:.1f} / {d['8_adapters']:.1f}{ratio}")
        bw = _bandwidth(q, base)
        read = "—" if bw is None else f"{r['step_weight_bytes'] / 2**20:.0f} MiB, {bw[0]:.1f} GB/s ({100 * bw[1]:.0f}%)"
        lines.append(f"| {r['quantization']} | {r.get('kernels', '?')} | " + " | ".join(cells) + f" | {read} |")
    return lines


def quantized_targets(q: dict[str, Any] | None) -> list[tuple[str, float | None, str, float, bool]]:
    """Issue 32: nf4 >= 3x / 1.5x / 1.0x the dense base's decode at batch 1 / 8 / 32, int8 >= 2x / 1.2x / 1.0x, with
    8 adapters mixed; batch-1 decode on each quantized base at >= 60% of the copy bandwidth."""
    ratios = [(f"{base} / dense decode, 8 adapters, batch {b}", _ratio(q, base, b), f"≥ {bar:.1f}", bar, True)
              for base, bars in TARGETS.items() for b, bar in zip((1, 8, 32), bars)]
    return ratios + [(f"{base} batch-1 decode, weights read / copy bandwidth", (_bandwidth(q, base) or (0, None))[1],
                      f"≥ {BANDWIDTH_TARGET:.0%}", BANDWIDTH_TARGET, True) for base in QUANTIZED]


# Issue 32: against llama.cpp on the same GGUF weights, base only at batch 1 and 8 >= 1.0x; with 8 adapters mixed
# >= 3x llama.cpp's figure (it does not batch requests whose adapters differ).
GGUF_PEER_TARGETS = {"base": 1.0, "8_adapters": 3.0}


def _peer_ratio(g: dict[str, Any] | None, fmt: str, batch: int, kind: str) -> float | None:
    f = (g or {}).get("formats", {}).get(fmt)
    if not f or str(batch) not in f["loraplex"] or str(batch) not in f["llama_cpp"]:
        return None
    return f["loraplex"][str(batch)][kind] / f["llama_cpp"][str(batch)][kind]


def gguf_peer_lines(g: dict[str, Any]) -> list[str]:
    lines = ["", "### The same GGUF weights: loraplex against llama.cpp", "",
             f"Measured on {g['machine']['cpu_description']}. llama.cpp {g['version']} (llama-server) and loraplex `--quantization gguf` on the same files; decode "
             f"tokens per second (loraplex: engine steps timed; llama.cpp: its own `timings`, summed over the requests "
             f"of a batch), median of {g['reps']} runs of {g['max_tokens']} tokens; activations and KV cache "
             f"{g['dtype']} ({g['kv_cache']} for llama.cpp's KV cache), adapters as GGUF LoRA f32 for llama.cpp.", "",
             "| weights | batch | loraplex base | llama.cpp base | ratio | loraplex 8 adapters | llama.cpp 8 adapters | "
             "ratio |", "|---|---|---|---|---|---|---|---|"]
    for fmt, f in g["formats"].items():
        for b in g["batches"]:
            ours, theirs = f["loraplex"][str(b)], f["llama_cpp"][str(b)]
            cells = [f"{ours[k]:.1f} | {theirs[k]:.1f} | {ours[k] / theirs[k]:.2f}x" for k in ("base", "8_adapters")]
            lines.append(f"| {fmt.upper()} ({f['file_bytes'] / 2**20:.0f} MiB) | {b} | " + " | ".join(cells) + " |")
    return lines


def gguf_peer_targets(g: dict[str, Any] | None) -> list[tuple[str, float | None, str, float, bool]]:
    """Base only at batch 1 and 8; 8 adapters mixed at batch 8 (at batch 1 there is nothing to mix)."""
    return [(f"{fmt.upper()} {'base only' if kind == 'base' else '8 adapters mixed'} vs llama.cpp, same file, batch "
             f"{b}", _peer_ratio(g, fmt, b, kind), f"≥ {bar:.1f}×", bar, True)
            for fmt in ("q4_1", "q8_0") for kind, bar in GGUF_PEER_TARGETS.items()
            for b in ((1, 8) if kind == "base" else (8,))]
