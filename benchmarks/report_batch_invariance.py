"""The report's section for benchmarks/batch_invariance.py: decode and prefill with `--batch-invariant` against the
default path, and how many greedy answers of a batch equal their solo answers on each."""

from __future__ import annotations

from typing import Any


def _row(b: dict[str, Any], mode: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in b["rows"] if r["mode"] == mode and r["batch"] == batch), None)


def _ratio(b: dict[str, Any] | None, batch: int, key: str) -> float | None:
    """Invariant / default for `key`: the median of the paired repetitions' ratios where recorded."""
    if b is None:
        return None
    ours, today = _row(b, "batch-invariant", batch), _row(b, "today", batch)
    if not ours or not today:
        return None
    paired = {"decode_tokens_per_s": "decode_ratio_paired", "prefill_s": "prefill_ratio_paired"}[key]
    return ours.get(paired, ours[key] / today[key])


def batch_invariance_lines(b: dict[str, Any]) -> list[str]:
    m = b["machine"]
    lines = ["", "### Batch invariance: its cost, and answers alone against in a batch", "",
             f"On {m['cpu_description']}, {m['dtype']}. Offline, {b['adapters']} adapters round-robin, greedy, "
             f"{b['max_tokens']} tokens, prefix cache off; both engines built once and measured in turn, median of "
             f"{b['reps']} repetitions. Decode: tokens per second of the steps where every request had its prompt "
             f"computed; prefill: the time of the other steps; ratios: the median of the repetitions' own ratios. "
             f"Solo answers: the batch's greedy answers that equal the same request's answer alone on that engine. "
             f"Batch-invariant: {b['invariance']}.", "",
             "| batch | default: decode tok/s | invariant: decode tok/s | ratio | default: prefill (ms) | "
             "invariant: prefill (ms) | ratio | solo answers, default / invariant |", "|---|---|---|---|---|---|---|---|"]
    for batch in sorted({r["batch"] for r in b["rows"]}):
        today, ours = _row(b, "today", batch), _row(b, "batch-invariant", batch)
        if today is None or ours is None:
            continue
        lines.append(f"| {batch} | {today['decode_tokens_per_s']:.1f} | {ours['decode_tokens_per_s']:.1f} | "
                     f"{_ratio(b, batch, 'decode_tokens_per_s'):.2f} | {today['prefill_s'] * 1e3:.0f} | "
                     f"{ours['prefill_s'] * 1e3:.0f} | {_ratio(b, batch, 'prefill_s'):.2f} | "
                     f"{today['equal_to_solo']}/{batch} / {ours['equal_to_solo']}/{batch} |")
    return lines


def batch_invariance_targets(b: dict[str, Any] | None) -> list[tuple[str, float | None, str, float, bool]]:
    """Issue 41's bar for making it the only path: at most 5% decode throughput at batch 32, 10% at batch 1."""
    return [("batch-invariant / default decode, batch 32", _ratio(b, 32, "decode_tokens_per_s"), "≥ 0.95", 0.95, True),
            ("batch-invariant / default decode, batch 1", _ratio(b, 1, "decode_tokens_per_s"), "≥ 0.90", 0.90, True)]
