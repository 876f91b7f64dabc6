"""Random LoRA adapters in PEFT's own format, for tests and benchmarks: made by PEFT on a transformers model,
with seeded random A and B (PEFT initialises B to zero, which would be a no-op adapter)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_adapter(base: torch.nn.Module, out: Path, *, r: int = 8, alpha: float = 16, targets: tuple[str, ...] |
                   list[str] = ATTENTION, seed: int = 0, strength: float = 0.5, **lora_kwargs: Any) -> Path:
    """Save to `out` a PEFT LoRA adapter for `base` (a transformers causal LM, left as it was): A ~ N(0, 1/in),
    B ~ N(0, strength^2/r). `lora_kwargs` go to PEFT's LoraConfig (use_rslora, alpha_pattern,
    layers_to_transform, ...)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            task_type="CAUSAL_LM", **lora_kwargs))
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    std = (1.0 if "lora_A" in name else strength) / math.sqrt(p.shape[1])
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        model.save_pretrained(out)
    finally:
        model.unload()  # the wrapped base model, restored in place
    return out
