"""The soak's checks: every completed greedy answer against its solo reference for the version that served it,
every request accounted for, and the table printed at the end."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import percentile
from benchmarks.soak_chaos import AdminLog
from benchmarks.soak_traffic import MAX_TOKENS, Record, Traffic


@dataclass
class Verdict:
    wrong: list[str] = field(default_factory=list)  # answers that differ from their version's solo reference
    unexpected: list[str] = field(default_factory=list)  # statuses a request of its kind should not get
    references: int = 0  # distinct (version, prompt) references computed
    distinguishing: float = 0.0  # share of adapter references whose text differs from the base model's


def solo_references(model_dir: Path, log: AdminLog, prompts: dict[tuple[str, int], list[int]],
                    wanted: set[tuple[str | None, str, int]]) -> dict[tuple[str | None, str, int], str]:
    """One request at a time (no batch to share), fp32 like the server: (version key or None, endpoint, prompt) ->
    the greedy text. Each version is registered under its own name, from the weights the chaos log recorded."""
    from loraplex import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", max_loras=2)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    names: dict[str, str] = {}
    out: dict[tuple[str | None, str, int], str] = {}
    for key, endpoint, prompt in sorted(wanted, key=lambda w: (w[0] or "", w[1], w[2])):
        adapter = None
        if key is not None:
            if key not in names:
                names[key] = "v" + key.replace("@", "-")
                llm.register_adapter(names[key], str(log.paths[key]))
            adapter = names[key]
        out[(key, endpoint, prompt)] = llm.generate([prompts[(endpoint, prompt)]], params, adapter)[0].outputs[0].text
    return out


def verify(traffic: Traffic, log: AdminLog, model_dir: Path, prompts: dict[tuple[str, int], list[int]]) -> Verdict:
    v = Verdict()
    records, base_name = traffic.records, traffic.base_name
    answered = [r for r in records if r.outcome == "completed" and r.kind in ("good", "burst")]
    wanted: set[tuple[str | None, str, int]] = set()
    for r in answered:
        key = None if r.served == base_name else r.served
        if key is not None and key not in log.paths:
            v.wrong.append(f"{r.adapter}: served by {r.served!r}, a version never registered")
            continue
        if key is not None and key.split("@")[0] != r.adapter or key is None and r.adapter is not None:
            v.wrong.append(f"asked {r.adapter}, served by {r.served!r}")
            continue
        wanted.add((key, r.endpoint, r.prompt))
    wanted |= {(None, e, p) for _, e, p in wanted}  # the base model's answers: how much the adapters change
    refs = solo_references(model_dir, log, prompts, wanted)
    v.references = len(refs)
    for r in answered:
        key = None if r.served == base_name else r.served
        ref = refs.get((key, r.endpoint, r.prompt))
        if ref is not None and r.text != ref:
            v.wrong.append(f"{r.served} {r.endpoint}#{r.prompt} stream={r.stream}: {r.text!r} != solo {ref!r}")
    adapter_refs = [(k, e, p) for k, e, p in refs if k is not None]
    if adapter_refs:
        v.distinguishing = sum(refs[w] != refs[(None, w[1], w[2])] for w in adapter_refs) / len(adapter_refs)
    for r in records:
        if r.outcome == "429":
            ok = r.kind == "burst"  # only the flooding key goes over its cap: no other tenant earns a 429
        elif r.outcome == "503":
            ok = traffic.during_burst(r)  # otherwise the clients never exceed --max-num-seqs + --max-queue
        elif r.kind in ("good", "burst"):
            ok = r.outcome in ("completed", "client-aborted") or (
                r.status == 404 and r.adapter is not None and log.was_unloaded(r.adapter, r.start, r.end))
        else:
            ok = r.status in r.expected and r.outcome == "4xx"
        if not ok:
            v.unexpected.append(f"{r.kind} {r.adapter} {r.endpoint}: {r.outcome} {r.status} {r.error[:200]}")
    return v


def latency(records: list[Record], phase: str) -> dict[str, float]:
    """Client-side TTFT and time per output token (ms) of completed streams in a phase."""
    done = [r for r in records if r.phase == phase and r.kind == "good" and r.stream and r.outcome == "completed"
            and r.first is not None]
    ttft = [r.first - r.start for r in done if r.first is not None]
    tpot = [(r.end - r.first) / (r.tokens - 1) for r in done if r.first is not None and r.tokens > 1]
    if not ttft:
        return {"streams": 0}
    return {"streams": len(done), "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "tpot_p50_ms": 1e3 * percentile(tpot, 50) if tpot else 0.0,
            "tpot_p99_ms": 1e3 * percentile(tpot, 99) if tpot else 0.0}


def accounting(records: list[Record]) -> dict[str, Any]:
    outcomes = Counter(r.outcome for r in records)
    statuses_5xx = sum(1 for r in records if r.status is not None and r.status >= 500 and r.status != 503)
    bad = Counter(r.kind for r in records if r.kind not in ("good", "burst"))
    return {"sent": len(records), "outcomes": dict(outcomes), "5xx": statuses_5xx, "hangs": outcomes.get("hang", 0),
            "bad_requests_by_kind": dict(bad), "bursts_sent": sum(r.kind == "burst" for r in records),
            "burst_429": sum(r.kind == "burst" and r.outcome == "429" for r in records)}


def table(rows: list[tuple[str, str, bool]]) -> str:
    """rows: (check, figure, passed) -> a fixed-width table."""
    width = max(len(c) for c, _, _ in rows)
    lines = [f"{'check':<{width}}  {'result':<7}  figure", "-" * (width + 40)]
    lines += [f"{c:<{width}}  {'ok' if p else 'FAILED':<7}  {f}" for c, f, p in rows]
    return "\n".join(lines)
