"""Cold adapter loads: latency from disk into a device slot (p50/p99), and throughput while a burst of cold
loads runs next to decoding requests, against the same burst with the adapters already loaded.

    .venv/bin/python -m benchmarks.adapter_cold_load [--loads 64] [--burst 16]

The adapter is the default model's r=16 q/k/v/o LoRA (7.4 MB of fp32 safetensors). The OS page cache
is warm (the files were just written): this measures our read, validation and slot copy, not the disk.
One load of another adapter comes first and is not counted: the process's first load pays one-time set-up.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, make_adapters, percentile, write_json
from loraplex import LLM, SamplingParams
from loraplex.adapters.key import AdapterSpec
from loraplex.engine.llm_engine import LLMEngine


def cold_latency(engine: LLMEngine, names: list[str]) -> list[float]:
    """Seconds from a request for a cold adapter to its weights in a device slot (disk -> host -> slot)."""
    latencies = []
    for name in names:
        key = engine.adapters.resolve(AdapterSpec(name))
        t0 = time.perf_counter()
        engine.adapters.prefetch(AdapterSpec(name))
        engine.adapters.wait([key])
        engine.step()  # collects the load
        grant = engine.adapters.take_slot(key)
        assert grant is not None and grant.needs_load
        engine.runner.load_adapter(grant.slot, engine.adapters.weights(key))
        latencies.append(time.perf_counter() - t0)
        engine.adapters.release_slot(key)
    return latencies


def burst_throughput(llm: LLM, warm: list[str], burst: list[str], max_tokens: int) -> float:
    """tokens/s of 16 running requests plus a burst of 16 more whose adapters are `burst` (cold or warm)."""
    engine = llm.engine
    prompt = llm.apply_chat_template([{"role": "user", "content": "Tell me a long story about a lighthouse."}])
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, name in enumerate(warm):
        engine.add_request(prompt, params, name, request_id=f"run{i}")
    for _ in range(4):  # the running batch is decoding before the burst arrives
        engine.step()
    t0 = time.perf_counter()
    for i, name in enumerate(burst):
        engine.add_request(prompt, params, name, request_id=f"burst{i}")
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].delta_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loads", type=int, default=64)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        probe = LLM(adapter_dir=str(root), max_loras=8, max_cpu_loras=4)
        names = make_adapters(probe.engine.facts.model_dir, root, args.loads + 3 * args.burst + 1)
        size_mb = (root / names[0] / "adapter_model.safetensors").stat().st_size / 1e6
        cold_latency(probe.engine, names[-1:])  # the process's first load pays one-time set-up: not counted
        lat = cold_latency(probe.engine, names[: args.loads])
        del probe

        slots = 2 * args.burst + 2
        llm = LLM(adapter_dir=str(root), max_loras=slots, max_cpu_loras=4 * args.burst, enable_prefix_caching=False)
        warm = names[args.loads : args.loads + args.burst]
        hot = names[args.loads + args.burst : args.loads + 2 * args.burst]
        cold = names[args.loads + 2 * args.burst : args.loads + 3 * args.burst]
        for n in warm + hot:  # resident before the runs: the "no loads" burst uses `hot`
            llm.engine.adapters.prefetch(AdapterSpec(n))
        llm.engine.adapters.wait()
        burst_throughput(llm, warm, hot, 8)  # warm-up: places warm + hot in device slots
        no_loads = burst_throughput(llm, warm, hot, args.max_tokens)
        with_loads = burst_throughput(llm, warm, cold, args.max_tokens)

    result = {
        "machine": machine(),
        "adapter_mb": round(size_mb, 2),
        "cold_load_ms": {"p50": 1e3 * percentile(lat, 50), "p99": 1e3 * percentile(lat, 99), "n": len(lat)},
        "burst": args.burst,
        "tokens_per_s_no_loads": no_loads,
        "tokens_per_s_with_cold_loads": with_loads,
        "ratio": with_loads / no_loads,
    }
    path = write_json("adapter_cold_load", result)
    print(f"cold load of a {size_mb:.1f} MB adapter, disk -> device slot: p50 {result['cold_load_ms']['p50']:.1f} ms, "
          f"p99 {result['cold_load_ms']['p99']:.1f} ms over {len(lat)} loads")
    print(f"throughput with a burst of {args.burst} cold loads: {with_loads:.0f} tok/s vs {no_loads:.0f} tok/s with "
          f"the burst's adapters resident: ratio {result['ratio']:.2f}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
