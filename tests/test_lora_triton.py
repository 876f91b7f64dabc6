"""The Triton multi-LoRA kernels (lora/triton_ops.py, the CUDA path) equal `lora_reference`, run on the CPU
in Triton's interpreter: the same programs, grids, masks and index arithmetic as on a GPU. The interpreter
cannot multiply bf16 in tl.dot, so there the kernels widen 16-bit operands to fp32 first (the same values;
a GPU's bf16 dot also accumulates in fp32). GPU timings: benchmarks/gpu.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import assert_tokens_bits_are_their_own, POPULARITY, SHAPES, assert_like_reference, fused_inputs, kernel_case

# Triton reads TRITON_INTERPRET when it is imported, when the kernels are defined and when they run (the fixture
# below): it is set for those moments only, so nothing else in this process runs Triton interpreted.
assert "loraplex.lora.triton_ops" not in sys.modules, "triton_ops was imported before its interpreter was set"
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from loraplex.lora import triton_ops  # noqa: E402
finally:
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def triton_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layout, slots: list[int],  # type: ignore[no-untyped-def]
                out: torch.Tensor | None = None) -> torch.Tensor:
    m, b_compact = fused_inputs(x, b, layout, slots)
    if out is None:
        out = torch.zeros(x.shape[0], sum(layout.part_sizes), dtype=x.dtype)
    return triton_ops.lora_add(x, a, b_compact, m.fused.order, m.fused.groups, layout.ranks, layout.offsets, layout.max_rank,
                               out, m.fused.max_group, max(layout.part_sizes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", POPULARITY)
@pytest.mark.parametrize("t", [1, 9, 40])
def test_triton_matches_reference(dtype: torch.dtype, shape: str, case: str, t: int) -> None:
    """Groups of 1 to 40 tokens (more than one 16-token block), unsorted tokens with base tokens between,
    ranks below max_rank and parts an adapter leaves alone, odd widths that mask every block edge."""
    x, a, b, layout, slots = kernel_case(shape, case, t, dtype)
    assert_like_reference(triton_lora(x, a, b, layout, slots), x, a, b, slots)


def test_triton_adds_into_the_base_output() -> None:
    x, a, b, layout, slots = kernel_case("qkv", "with_base", 9, torch.float32)
    base = torch.randn(9, sum(layout.part_sizes))
    out = triton_lora(x, a, b, layout, slots, out=base.clone())
    zero = triton_lora(x, a, b, layout, slots)
    torch.testing.assert_close(out, base + zero, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_tokens_bits_do_not_depend_on_the_tokens_beside_it(dtype: torch.dtype, shape: str) -> None:
    """Batch invariance of the Triton kernels (issue 41, item 4): their blocks are fixed (16 tokens, 64 inputs, 64
    outputs, the rank block by the layout's max_rank), never chosen by the step's size; the grid only grows. So each
    token added into a base output has the bits it has alone, in batches of 2 to 40 tokens mixing the three slots
    and base tokens, groups spanning one block or three."""
    assert_tokens_bits_are_their_own(triton_lora, shape, dtype, 40, (2, 17, 40))
