"""Shared fixtures: the embedded default model's directory, a transformers copy of it, and real PEFT adapters."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplex.models.loader import resolve_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTN + MLP


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model(None)


@pytest.fixture(scope="session")
def hf_base(default_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def randomize_lora(model: torch.nn.Module, seed: int, strength: float = 0.5) -> None:
    """Give every lora_A/lora_B random non-zero weights (PEFT initialises B to zero, a no-op adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * strength / math.sqrt(p.shape[1]))


def make_peft_adapter(base: torch.nn.Module, out: Path, *, r: int = 8, alpha: float = 16, targets: list[str] | None = None,
                      seed: int = 0, strength: float = 0.5, **lora_kwargs: object) -> Path:
    """Build a PEFT LoRA adapter on `base` with random weights and save it (safetensors) to `out`."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ATTN, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(base, cfg)
    try:
        randomize_lora(peft_model, seed, strength)
        peft_model.save_pretrained(out)
    finally:
        peft_model.unload()  # restore the shared base model in place
    return out


@pytest.fixture(scope="session")
def adapter_factory(hf_base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("adapters")

    def make(name: str, **kwargs: object) -> Path:
        path = root / name
        if not path.exists():
            make_peft_adapter(hf_base, path, **kwargs)  # type: ignore[arg-type]
        return path

    return make
