"""The transformers/PEFT peers on the shared offline workload, run in this venv:

- transformers, base model only, one static batch;
- PEFT's mixed-adapter batch, `generate(adapter_names=[...])`, one static batch;
- the sequential PEFT server pattern: one request at a time, `set_adapter`, then `generate`;
- the cost of one `set_adapter` call (the switching-cost anchor).

    .venv/bin/python -m benchmarks.peers_hf [--requests 32 --max-tokens 64 --sequential 8]

Same prompts (benchmarks.common.workload_prompts), adapters (round-robin), the dtype loraplex resolves here
(bf16 where the CPU multiplies it natively, else fp32), greedy, and
EOS ignored (min_new_tokens = max_new_tokens) as the loraplex figures. The sequential pattern is timed
on the first `--sequential` requests only (it is ~30x slower); its figure is tokens/s all the same.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import default_model_dir, machine, make_adapters, round_robin, workload_prompts, write_json
from loraplex.hardware import resolve_dtype


def batch_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer set up for static batches of a decoder-only model: left padding, a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def static_batch(model: Any, tok: Any, prompts: list[str], max_tokens: int, **kw: Any) -> dict[str, float]:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, **kw)
    seconds = time.perf_counter() - t0
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def sequential(model: Any, tok: Any, prompts: list[str], adapters: list[str], max_tokens: int) -> dict[str, float]:
    """The naive server: for each request, switch the one active adapter, then generate alone."""
    tokens, t0 = 0, time.perf_counter()
    for prompt, name in zip(prompts, adapters):
        model.set_adapter(name)
        enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        tokens += out.shape[1] - enc["input_ids"].shape[1]
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "requests": len(prompts)}


def set_adapter_ms(model: Any, names: list[str], calls: int = 400) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        model.set_adapter(names[i % len(names)])
    return 1e3 * (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--sequential", type=int, default=8, help="requests timed in the sequential pattern")
    ap.add_argument("--adapters", type=Path, default=None)
    args = ap.parse_args()
    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = default_model_dir()
    tok = batch_tokenizer(model_dir)
    prompts = workload_prompts(tok, args.requests)
    result: dict[str, Any] = {"machine": machine(), "peft": peft.__version__, "transformers": transformers.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(model_dir, root, max(args.counts))
        dtype = resolve_dtype().dtype
        result["dtype"] = str(dtype).removeprefix("torch.")
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        static_batch(base, tok, prompts[:4], 4)  # warm-up
        result["transformers_base"] = static_batch(base, tok, prompts, args.max_tokens)
        print(f"transformers base, static batch: {result['transformers_base']['tokens_per_s']:.1f} tok/s", flush=True)

        model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
        for n in names[1 : max(args.counts)]:
            model.load_adapter(str(root / n), adapter_name=n)
        model.eval()
        result["peft_mixed"] = {}
        for k in args.counts:
            adapters = round_robin(names[:k], args.requests)
            static_batch(model, tok, prompts[:4], 4, adapter_names=adapters[:4])  # warm-up
            r = static_batch(model, tok, prompts, args.max_tokens, adapter_names=adapters)
            result["peft_mixed"][str(k)] = r
            print(f"PEFT mixed batch, {k} adapters: {r['tokens_per_s']:.1f} tok/s", flush=True)
        seq = args.sequential
        result["peft_sequential"] = sequential(model, tok, prompts[:seq], round_robin(names[:8], seq), args.max_tokens)
        print(f"sequential PEFT (set_adapter + generate): {result['peft_sequential']['tokens_per_s']:.1f} tok/s", flush=True)
        result["peft_set_adapter_ms"] = set_adapter_ms(model, names[:8])
        print(f"PEFT set_adapter: {result['peft_set_adapter_ms']:.3f} ms per call", flush=True)
    print(f"written to {write_json('peers_hf', result)}")


if __name__ == "__main__":
    main()
