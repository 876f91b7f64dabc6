"""Structured outputs: what a JSON schema costs the batch, and how long a schema takes to compile.

    .venv/bin/python -m benchmarks.structured --adapters results/adapters

Decode throughput at batch 32 over 8 adapters (request i on adapter i % 8), 64 tokens each, greedy: none of the
requests constrained, against half of them under a JSON schema (an array of 40 short strings, longer than 64
tokens, so every request decodes all 64 steps in both runs and the work is the same). One warm-up pass on other
prompts first. Compile time: 20 distinct schemas through engine.structured (JSON -> grammar -> validated against
the tokenizer), after the one-time tokenizer set-up, which is reported on its own.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (default_model_dir, machine, make_adapters, percentile, round_robin, warmup,
                               workload_prompts, write_json)
from loraplex import LLM, SamplingParams
from loraplex.sampling import StructuredOutput

LIST_SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "minItems": 40, "maxItems": 40,
                                                          "items": {"type": "string", "maxLength": 6}}},
               "required": ["words"], "additionalProperties": False}


def schemas(n: int) -> list[dict[str, Any]]:
    """n distinct form-like schemas (a few fields of each kind), so none is served from the grammar cache."""
    out = []
    for i in range(n):
        s: dict[str, Any] = {"type": "object", "properties": {
            f"name_{i}": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", f"c{i}"]}, "maxItems": 5},
            "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                           "pattern": "^[0-9]{5}$"}},
                        "required": ["city"]}}, "required": [f"name_{i}", "age"], "additionalProperties": False}
        out.append(copy.deepcopy(s))
    return out


def run(llm: LLM, prompts: list[str], adapters: list[str | None], params: list[SamplingParams]) -> dict[str, float]:
    llm.generate(warmup(prompts), [replace(p, max_tokens=4) for p in params], adapters)  # every path, other prompts
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, adapters)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=Path, default=Path("results/adapters"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    names = make_adapters(default_model_dir(), args.adapters, 8)
    llm = LLM(adapter_dir=str(args.adapters), max_loras=8, enable_prefix_caching=False)
    prompts = workload_prompts(llm.tokenizer, args.batch)
    adapters: list[str | None] = list(round_robin(names, args.batch))
    plain = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    schema = SamplingParams(max_tokens=args.max_tokens, temperature=0,
                            structured=StructuredOutput("json_schema", json.dumps(LIST_SCHEMA)))
    t0 = time.perf_counter()
    llm.engine.structured.grammar(StructuredOutput("json_object"))  # builds the tokenizer's trie once
    setup_s = time.perf_counter() - t0
    none = run(llm, prompts, adapters, [plain] * args.batch)
    half = run(llm, prompts, adapters, [schema if i % 2 == 0 else plain for i in range(args.batch)])
    compile_s = []
    for s in schemas(20):
        t0 = time.perf_counter()
        llm.engine.structured.grammar(StructuredOutput("json_schema", json.dumps(s)))
        compile_s.append(time.perf_counter() - t0)
    out = {"machine": machine(), "batch": args.batch, "adapters": 8, "max_tokens": args.max_tokens,
           "no_schema": none, "half_schema": half, "ratio": half["tokens_per_s"] / none["tokens_per_s"],
           "tokenizer_setup_ms": 1e3 * setup_s,
           "compile_ms": {"p50": 1e3 * percentile(compile_s, 50), "p99": 1e3 * percentile(compile_s, 99), "n": len(compile_s)}}
    print(f"batch {args.batch}, 8 adapters: {none['tokens_per_s']:.1f} tok/s without schemas, {half['tokens_per_s']:.1f} "
          f"with half the requests under a JSON schema ({out['ratio']:.2f}x); schema compile p50 "
          f"{out['compile_ms']['p50']:.1f} ms, tokenizer set-up {out['tokenizer_setup_ms']:.0f} ms", flush=True)
    print(f"written to {write_json('structured', out)}")


if __name__ == "__main__":
    main()
