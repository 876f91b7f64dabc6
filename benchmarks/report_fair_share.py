"""The report's section for benchmarks/fair_share.py: a quiet tenant alone and beside a flood, throughput against
first come first served on the same traffic, and four flooding tenants' shares by weight."""

from __future__ import annotations

from typing import Any


def fair_share_lines(f: dict[str, Any]) -> list[str]:
    alone, fair, fcfs, sh = f["alone"], f["fair"], f["fcfs"], f["shares"]
    lines = ["", f"### Fair share between tenants: a quiet key beside a flood of {f['flood']} streams", "",
             f"On {f['machine']['cpu_description']}, {f['machine']['dtype']}. `loraplex serve` with its default batch "
             "(64) and queue (256), one key per tenant. The quiet key sends "
             f"one {f['quiet_tokens']}-token request every {f['quiet_gap_s']} s ({f['quiet_requests']} requests a round, "
             f"{f['alone_requests']} alone); the "
             f"flooding key keeps {f['flood']} streams of {f['flood_tokens']} tokens in flight, each replaced when it "
             f"ends. *First come, first served*: the same traffic with the quiet requests sent under the flooding key "
             f"(one tenant, ordered by arrival). Throughput: output tokens per key as the server counted them over "
             f"{f['measure_s']:.0f} s, after {f['warm_s']:.0f} s of flood. TTFT: the client's, send to first text. The "
             f"two policies alternate for {f.get('rounds', 1)} rounds (TTFTs pooled, throughputs averaged; per round: "
             + ", ".join(f"{a['tokens_per_s']:.0f} / {b['tokens_per_s']:.0f}" for a, b in
                         zip(fair.get("rounds", []), fcfs.get("rounds", []))) + " tok/s fair / first come).", "",
             "| quiet tenant | TTFT p50 (ms) | TTFT p99 (ms) | vs alone, p50 | vs alone, p99 | total tok/s |",
             "|---|---|---|---|---|---|",
             f"| alone | {alone['p50']:.0f} | {alone['p99']:.0f} | | | |"]
    for name, r in (("beside the flood, fair share", fair), ("beside the flood, first come first served", fcfs)):
        t = r["quiet_ttft_ms"]
        lines.append(f"| {name} | {t['p50']:.0f} | {t['p99']:.0f} | {t['p50'] / alone['p50']:.2f}x | "
                     f"{t['p99'] / alone['p99']:.2f}x | {r['tokens_per_s']:.0f} |")
    lines += ["", f"The scheduler's own cost: {fair['decode_tokens_per_busy_s']:.0f} decode tokens per second of "
              f"engine steps with fair share against {fcfs['decode_tokens_per_busy_s']:.0f} first come first "
              f"served ({f['tokens_per_busy_s_ratio']:.3f}, median of the paired rounds; the engine's last 128 "
              f"steps of each window, idle time and the HTTP side left out); {fair['decode_tokens_per_step']:.1f} "
              f"against {fcfs['decode_tokens_per_step']:.1f} decode tokens per step, "
              f"{fair['first_token_steps']} of {fair['steps']} fair-share steps being first-token steps (the quiet "
              "key's prompt alone). The "
              "wall-clock throughputs of the rounds vary more than that between rounds of one policy: this "
              "machine's step time drifts."]
    step = fair.get("full_batch_step_ms_p50")
    own = [r["first_token_step_ms_p50"] for r in fair.get("rounds", []) if r.get("first_token_step_ms_p50")]
    if step and own:
        lines += ["", f"A first token beside the flood waits for the step in progress ({step:.0f} ms at p50 with 32 or "
                  f"more in the batch), then takes a step of its own prompt ({sorted(own)[len(own) // 2]:.0f} ms at "
                  "p50): the floor of the quiet tenant's TTFT while another tenant keeps the batch full is about half "
                  "a full step and one small one, on top of its HTTP path."]
    elif step:
        lines += ["", f"A first token beside the flood waits for the step in progress, then takes a step of the full "
                  f"batch: {step:.0f} ms at p50 here (batches of 32 or more), so about 1.5 steps, "
                  f"{1.5 * step:.0f} ms, is the floor of the quiet tenant's TTFT while another tenant keeps the batch "
                  f"full."]
    lines += ["", f"Four keys flooding at once, {f['flood'] // len(sh['tenants'])} streams each, over "
              f"{sh['window_s']:.0f} s ({sh['tokens_per_s']:.0f} tok/s in all):", "",
              "| key | weight | output tokens | share | its weight's | off by |", "|---|---|---|---|---|---|"]
    for r in sh["tenants"]:
        lines.append(f"| {r['key']} | {r['weight']} | {r['tokens']} | {100 * r['share']:.1f}% | "
                     f"{100 * r['wanted']:.1f}% | {100 * r['error']:+.1f}% |")
    errors = fair["flood_error_count"] + fcfs["flood_error_count"] + sh["flood_error_count"]
    quiet_errors = len(alone["errors"]) + len(fair["quiet_ttft_ms"]["errors"]) + len(fcfs["quiet_ttft_ms"]["errors"])
    lines += ["", f"Errors: {quiet_errors} quiet requests, {errors} flood requests."]
    if alone.get("steal") is not None:  # CPU time the hypervisor gave other guests, per phase
        rounds = [f"{100 * (a.get('steal') or 0):.0f}% / {100 * (b.get('steal') or 0):.0f}%"
                  for a, b in zip(fair.get("rounds", []), fcfs.get("rounds", []))]
        lines += ["", f"CPU time stolen by the hypervisor (other guests): alone {100 * alone['steal']:.0f}%, rounds "
                  f"{', '.join(rounds)} (fair / first come), shares {100 * (sh.get('steal') or 0):.0f}%."]
    return lines


def fair_share_targets(f: dict[str, Any] | None) -> list[tuple[str, float | None, str, float, bool]]:
    return [("fair share: quiet tenant's TTFT p50 beside a flood / alone", f["ttft_p50_ratio"] if f else None, "≤ 2×",
             2.0, False),
            ("fair share: quiet tenant's TTFT p99 beside a flood / alone", f["ttft_p99_ratio"] if f else None, "≤ 3×",
             3.0, False),
            ("fair share: throughput / first come first served (median of paired rounds)",
             f["throughput_ratio"] if f else None, "≥ 0.95", 0.95, True),
            ("fair share: largest share's error against its weight's, weights 1,1,1,3",
             f["shares"]["max_abs_error"] if f else None, "≤ 0.05", 0.05, False)]
