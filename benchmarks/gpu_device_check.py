"""`--device auto` and `--gpu-memory-utilization` on a real GPU: the engine's device, dtype and KV budget, and its
greedy tokens against PEFT's on the same device, base and adapter.

    python benchmarks/gpu_device_check.py --tokenizer DIR [--utilization 0.25] --out result.json

DIR holds the default model's tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja); the
model is a small random Llama of that vocabulary made here, so nothing large has to travel to the GPU machine.
Where torch sees no GPU it runs the same on the CPU (a dry run: auto resolves to cpu, the utilization is logged as
not applying). Needs torch, transformers, peft, safetensors and llguidance, and `src` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 253, 1789, 30]  # fixed ids, so the tokenizer plays no part


def tiny_llama(tokenizer: Path, out: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    return model


def peft_greedy(model: torch.nn.Module, adapter: Path | None, device: str, n: int) -> list[int]:
    from peft import PeftModel

    m = PeftModel.from_pretrained(model, str(adapter)) if adapter else model
    m = m.to(device)
    ids = torch.tensor([PROMPT_IDS], device=device)
    with torch.no_grad():  # argmax step by step: generate()'s min_new_tokens would mask EOS, which ignore_eos does not
        for _ in range(n):
            ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    if adapter:
        m.unload()
    return ids[0, len(PROMPT_IDS):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--utilization", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from loraplex import LLM, SamplingParams
    from loraplex.hardware import resolve_device
    from loraplex.training.synthetic import random_adapter

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    hf = tiny_llama(args.tokenizer, work / "model")
    adapter = random_adapter(hf, work / "adapter", r=8, seed=3, strength=2.0)
    device = resolve_device("auto")
    result: dict[str, object] = {"torch": torch.__version__, "device_auto": device,
                                 "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        result["gpu_total_bytes"], result["gpu_free_before_bytes"] = total, free
    t0 = time.perf_counter()
    llm = LLM(str(work / "model"), lora_modules={"a": str(adapter)}, device="auto", dtype="float32",
              gpu_memory_utilization=args.utilization, max_model_len=256, max_loras=2, max_lora_rank=8)
    result["engine_start_s"] = round(time.perf_counter() - t0, 2)
    plan = llm.engine.facts.memory
    result.update(engine_device=str(llm.engine.runner.device), engine_dtype=str(llm.engine.runner.dtype),
                  kv_cache_bytes=plan.kv_cache, kv_blocks=plan.kv_blocks, weights_bytes=plan.weights,
                  adapter_slot_bytes=plan.adapter_slot * plan.adapter_slots)
    if device.startswith("cuda"):
        share = int(args.utilization * result["gpu_total_bytes"])  # type: ignore[operator]
        result["kv_cache_share_of_allowed"] = round(plan.kv_cache / share, 3)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPT_IDS, PROMPT_IDS], params, adapters=[None, "a"])
    ours = [list(o.outputs[0].token_ids) for o in outs]
    refs = [peft_greedy(hf, None, device, args.tokens), peft_greedy(hf, adapter, device, args.tokens)]
    result.update(loraplex_tokens=ours, peft_tokens=refs, base_matches_peft=ours[0] == refs[0],
                  adapter_matches_peft=ours[1] == refs[1], adapter_changes_tokens=ours[0] != ours[1])
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
