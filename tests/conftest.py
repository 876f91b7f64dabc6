"""Shared fixtures: the embedded default model's directory, a transformers copy of it, and real PEFT adapters."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from loraplex.lora.mapping import LoRAMapping
from loraplex.lora.slot_layout import SlotLayout, SlotShape
from loraplex.models.loader import resolve_model
from loraplex.training.synthetic import random_adapter

if TYPE_CHECKING:
    from loraplex import LLM

# A test over its time limit (pyproject.toml: pytest-timeout) fails with every thread's stack (tests/hang_guard.py).
pytest_plugins = ["hang_guard"]

def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`: one worker per core), each worker's torch gets its share of the cores:
    two workers of two OpenMP threads each on two cores spin against each other and ran slower than one."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


# The longest files, longest first (seconds on a 2-core AVX2 CPU, two xdist workers): a scheduling hint only.
LONGEST_FIRST = ["test_soak.py", "test_training.py", "test_cluster.py", "test_quant.py", "test_limits.py",
                 "test_mixed_batch.py", "test_adapter_lifecycle.py", "test_structured.py", "test_crash_safety.py",
                 "test_server_lifecycle.py", "test_tools.py", "test_cpu_attention.py", "test_server_fuzz.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, then the other files with a `slow` test, then the rest (each group in collection
    order): under xdist's per-file distribution the long files start at once and the short ones fill the gaps,
    instead of a long file starting last on an otherwise idle run."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path.name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(item.path.name)
        return (1 if item.path in slow else 2), 0

    items.sort(key=rank)


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
def bf16_checkpoint(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model saved as a bf16 checkpoint (what most Hugging Face checkpoints are)."""
    from benchmarks.common import bf16_copy

    return bf16_copy(default_model_dir, tmp_path_factory.mktemp("bf16-checkpoint"))


@pytest.fixture(scope="session")
def hf_base(default_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def adapter_factory(hf_base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("adapters")

    def make(name: str, **kwargs: object) -> Path:
        path = root / name
        if not path.exists():
            random_adapter(hf_base, path, **kwargs)  # type: ignore[arg-type]
        return path

    return make


def assert_same_greedy_answers(reference: LLM, ours: LLM, adapter: str, tolerance: float = 2e-3) -> None:
    """Three chat prompts, on the base model and on `adapter`: greedy tokens equal `reference`'s one for one, and
    their log-probabilities within `tolerance` (fp32 rounding of a different summation order); the base says Paris."""
    from loraplex import SamplingParams

    prompts = [[{"role": "user", "content": p}] for p in
               ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.")]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    for name in (None, adapter):
        a = reference.chat(prompts, params, name, use_tqdm=False)  # type: ignore[arg-type]
        b = ours.chat(prompts, params, name, use_tqdm=False)  # type: ignore[arg-type]
        for x, y in zip(a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids, (name, x.outputs[0].text, y.outputs[0].text)
            for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
                assert abs(lx.logprob - ly.logprob) < tolerance
        assert name is not None or "Paris" in b[0].outputs[0].text


# ---- multi-LoRA kernel tests (tests/test_lora_cpu_kernel.py, tests/test_lora_triton.py) ----

def packed_weights(parts: list[int], in_f: int, max_rank: int, ranks: list[list[int]], dtype: torch.dtype,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, SlotLayout]:
    """Slots of a packed layer: A [S, P*max_rank, IN] and block-diagonal B [S, P*max_rank, OUT] (the torch
    kernels' layout; SlotShape.to_compact gives the fused kernels'), rows past each (slot, part) rank zero,
    and the slot layout the fused kernels read (compact=True)."""
    g = torch.Generator().manual_seed(seed)
    shape = SlotShape(tuple(parts), in_f, max_rank, compact=False)
    a, b = torch.zeros(shape.a_shape(len(ranks))), torch.zeros(shape.b_shape(len(ranks)))
    for slot, slot_ranks in enumerate(ranks):
        for part, r in enumerate(slot_ranks):
            shape.a_part(a[slot], part)[:r] = torch.randn(r, in_f, generator=g) / in_f**0.5
            shape.b_part(b[slot], part)[:r] = torch.randn(r, parts[part], generator=g) / max(r, 1)**0.5
    layout = SlotLayout.on(replace(shape, compact=True), len(ranks), "cpu", torch.tensor(ranks))
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
    slots = popularity(case, t, len(ranks), seed=1)
    x = torch.randn(t, in_f, generator=torch.Generator().manual_seed(7)).to(dtype)
    return x, a, b, layout, slots


# Adapter popularity in a step (Punica's cases, plus base-model tokens and a subset of the slots): every LoRA
# kernel is tested over all of them.
POPULARITY = ["identical", "distinct", "uniform", "zipf", "skewed", "with_base", "subset"]


def popularity(case: str, t: int, slots: int, seed: int = 0) -> list[int]:
    """The slot of each of t tokens (-1: the base model), over `slots` slots, unsorted; at least one adapter token."""
    rng = random.Random(f"{case}-{t}-{seed}")
    if case == "identical":  # every token on one adapter
        out = [slots // 2] * t
    elif case == "distinct":  # every token its own adapter (round-robin once t > slots)
        out = [(i + 1) % slots for i in range(t)]
    elif case == "uniform":
        out = [rng.randrange(slots) for _ in range(t)]
    elif case == "zipf":
        out = rng.choices(range(slots), weights=[1 / (k + 1) ** 1.5 for k in range(slots)], k=t)
    elif case == "skewed":  # one hot tenant, a few tokens elsewhere
        out = [0 if rng.random() < 0.9 else rng.randrange(1, slots) for _ in range(t)]
    elif case == "with_base":
        out = [rng.choice([-1, -1, *range(slots)]) for _ in range(t)]
    elif case == "subset":  # two slots in use (the first and the last), some base tokens
        out = [rng.choice([0, slots - 1, -1]) for _ in range(t)]
    else:
        raise AssertionError(case)
    if all(s < 0 for s in out):
        out[t // 2] = slots - 1
    return out


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


def assert_tokens_bits_are_their_own(kernel: Callable[..., object], shape: str, dtype: torch.dtype, tokens: int,
                                     sizes: tuple[int, ...]) -> None:
    """Batch invariance of a fused LoRA kernel (issue 41): `kernel(x, a, b, layout, slots, out=...)` adds into a base
    output; each of `tokens` tokens (three slots and base tokens, random) gets alone the bits it gets in calls of each
    of `sizes` tokens, starting anywhere."""
    x, a, b, layout, _ = kernel_case(shape, "uniform", tokens, dtype)
    g = torch.Generator().manual_seed(5)
    slots = torch.randint(-1, 3, (tokens,), generator=g).tolist()
    base = torch.randn(tokens, b.shape[-1], generator=g).to(dtype)

    def added(rows: slice) -> torch.Tensor:
        out = base[rows].clone()
        if any(s >= 0 for s in slots[rows]):  # base-model tokens only: no mapping, nothing added
            kernel(x[rows].contiguous(), a, b, layout, slots[rows], out=out)
        return out

    alone = torch.cat([added(slice(i, i + 1)) for i in range(tokens)])
    assert not torch.equal(alone, base)
    for m in sizes:
        start = int(torch.randint(0, tokens - m + 1, (1,), generator=g))
        rows = slice(start, start + m)
        assert torch.equal(added(rows), alone[rows]), m


def fused_inputs(x: torch.Tensor, b: torch.Tensor, layout: SlotLayout, slots: list[int]) -> tuple[LoRAMapping, torch.Tensor]:
    """What the fused kernels take beside x and A: the step's mapping (tokens grouped by slot) and B compact."""
    from loraplex.lora.mapping import build_mapping

    m = build_mapping(slots, x.dtype, kernel="fused")
    assert m is not None and m.fused is not None
    return m, layout.shape.to_compact(b)


# ---- a disk that fills up (tests/test_registry.py, tests/test_crash_safety.py) ----

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, mounted for the test (root only; skipped, with the reason, elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path) -> Path:
    """Write a file until the disk has not one byte left; returns it (unlink it to free the space)."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler
