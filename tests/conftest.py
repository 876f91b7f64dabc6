"""Shared fixtures: the embedded default model's directory, a transformers copy of it, and real PEFT adapters."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplex.lora.mapping import LoRAMapping
from loraplex.lora.ops import SlotLayout
from loraplex.models.loader import resolve_model

def pytest_report_header() -> list[str]:
    """The CPU class and what dtype auto resolves to: test times and bf16 paths depend on both."""
    from loraplex import hardware

    return [f"cpu: {hardware.cpu().describe()}; {hardware.resolve_dtype('auto').describe()}"]


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


# ---- multi-LoRA kernel tests (tests/test_lora_cpu_kernel.py, tests/test_lora_triton.py) ----

def packed_weights(parts: list[int], in_f: int, max_rank: int, ranks: list[list[int]], dtype: torch.dtype,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, SlotLayout]:
    """Slots of a packed layer: A [S, P*max_rank, IN] and block-diagonal B [S, P*max_rank, OUT] (the torch
    kernels' layout; cpu_kernel.compact_b gives the fused kernels'), rows past each (slot, part) rank zero,
    and the slot layout the fused kernels read (compact=True)."""
    g = torch.Generator().manual_seed(seed)
    s, p = len(ranks), len(parts)
    offsets = [0]
    for size in parts:
        offsets.append(offsets[-1] + size)
    a = torch.zeros(s, p * max_rank, in_f)
    b = torch.zeros(s, p * max_rank, offsets[-1])
    for slot in range(s):
        for part, r in enumerate(ranks[slot]):
            rows = slice(part * max_rank, part * max_rank + r)
            a[slot, rows] = torch.randn(r, in_f, generator=g) / in_f**0.5
            b[slot, rows, offsets[part]:offsets[part + 1]] = torch.randn(r, parts[part], generator=g) / max(r, 1)**0.5
    layout = SlotLayout(ranks=torch.tensor(ranks, dtype=torch.int32), offsets=torch.tensor(offsets),
                        part_sizes=tuple(parts), max_rank=max_rank, compact=True)
    return a.to(dtype), b.to(dtype), layout


# Shapes that reach every tail: IN % 32, part widths % 64 and % 32, groups of 1..9 tokens (% 4).
SHAPES = {
    "qkv": dict(parts=[96, 32, 32], in_f=64, max_rank=8),
    "odd": dict(parts=[70, 33, 5], in_f=45, max_rank=5),
    "single": dict(parts=[130], in_f=96, max_rank=16),
    "wide": dict(parts=[600, 70], in_f=40, max_rank=4),  # a part split into several column work items (> 256)
}


def kernel_case(shape: str, case: str, t: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SlotLayout, list[int]]:
    """x, A, B (block-diagonal), layout and token slots for one kernel test: three slots, one at full
    rank, one below max_rank, one touching only the first part (rank 0 elsewhere)."""
    spec = SHAPES[shape]
    parts, in_f, max_rank = spec["parts"], spec["in_f"], spec["max_rank"]
    ranks = [[max_rank] * len(parts), [max(1, max_rank - 3)] * len(parts), [max_rank] + [0] * (len(parts) - 1)]
    a, b, layout = packed_weights(parts, in_f, max_rank, ranks, dtype, seed=t)
    slots = slot_mix(case, t, len(ranks), seed=1)
    if all(s < 0 for s in slots):
        slots[0] = 2
    x = torch.randn(t, in_f, generator=torch.Generator().manual_seed(7)).to(dtype)
    return x, a, b, layout, slots


KERNEL_CASES = ["one", "distinct", "shuffled_with_base"]


def slot_mix(case: str, t: int, slots: int, seed: int) -> list[int]:
    rng = random.Random(f"{case}-{t}-{seed}")
    if case == "one":
        return [1] * t
    if case == "distinct":
        return [i % slots for i in range(t)]
    if case == "shuffled_with_base":  # unsorted, base tokens in between
        return [rng.choice([-1, *range(slots)]) for _ in range(t)]
    raise AssertionError(case)


def assert_like_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: list[int]) -> None:
    """y = the LoRA term of every token; base tokens get exactly 0. fp32: to ~1e-5. 16-bit: no further from
    the fp32 reference than the torch kernel in the same dtype is (or two units of the output's rounding)."""
    from loraplex.lora.mapping import build_mapping
    from loraplex.lora.ops import lora_grouped, lora_reference

    ref = lora_reference(x.float(), a.float(), b.float(), torch.tensor(slots)).float()
    for i, s in enumerate(slots):
        if s < 0:
            assert torch.all(y[i] == 0)
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        return
    torch_y = lora_grouped(x, a, b, build_mapping(slots, x.dtype, kernel="grouped"))  # type: ignore[arg-type]
    ours, theirs = (y.float() - ref).abs().max().item(), (torch_y.float() - ref).abs().max().item()
    rounding = 2 * torch.finfo(x.dtype).eps * ref.abs().max().item()  # two units of the output's rounding
    assert ours <= max(1.5 * theirs, rounding), (ours, theirs, rounding)


def fused_inputs(x: torch.Tensor, b: torch.Tensor, layout: SlotLayout, slots: list[int]) -> tuple[LoRAMapping, torch.Tensor]:
    """What the fused kernels take beside x and A: the step's mapping (tokens grouped by slot) and B compact."""
    from loraplex.lora import cpu_kernel
    from loraplex.lora.mapping import build_mapping

    m = build_mapping(slots, x.dtype, kernel="fused")
    assert m is not None and m.kernel == "fused" and m.order is not None and m.groups is not None
    return m, cpu_kernel.compact_b(b, layout.offsets.tolist(), layout.max_rank)
