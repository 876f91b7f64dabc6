"""Multi-LoRA ops: the torch grouped kernel (the fallback where the fused one does not run) equals
`lora_reference` for every adapter-popularity case; the mapping describes each step exactly. The fused kernels are
held to the same reference over the same cases in tests/test_lora_cpu_kernel.py and tests/test_lora_triton.py."""

from __future__ import annotations

import pytest
import torch

from conftest import POPULARITY as CASES
from conftest import popularity
from loraplex.lora.mapping import build_mapping
from loraplex.lora.ops import TOKEN_TILE, lora_apply, lora_grouped, lora_reference, lora_tokenwise

S, R, IN, OUT = 8, 16, 64, 96
KERNELS = {"grouped": lora_grouped, "tokenwise": lora_tokenwise}


def token_slots_for(case: str, t: int, seed: int = 0) -> list[int]:
    return popularity(case, t, S, seed)


def make_weights(dtype: torch.dtype, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, IN, generator=g).to(dtype)
    a = (torch.randn(S, R, IN, generator=g) / IN**0.5).to(dtype)
    b = (torch.randn(S, R, OUT, generator=g) / R**0.5).to(dtype)
    return x, a, b


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t", [1, 7, 64])
def test_fast_paths_match_reference_fp32(kernel: str, case: str, t: int) -> None:
    """In fp32 each kernel equals the token-by-token reference to ~1e-5, and base (-1) tokens get exactly 0."""
    slots = token_slots_for(case, t)
    x, a, b = make_weights(torch.float32, t)
    m = build_mapping(slots, torch.float32, kernel=kernel)
    assert m is not None and m.kernel == kernel
    y = KERNELS[kernel](x, a, b, m)
    ref = lora_reference(x, a, b, torch.tensor(slots))
    assert y.shape == (t, OUT) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    base = torch.tensor([s < 0 for s in slots])
    assert torch.all(y[base] == 0)
    assert torch.all(ref[~base].abs().amax(-1) > 0)  # adapter tokens really got a delta
    torch.testing.assert_close(lora_apply(x, a, b, m), y, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t", [1, 7, 64])
def test_fast_paths_match_reference_bf16(kernel: str, case: str, t: int) -> None:
    """In bf16 each kernel matches the fp32-accumulated reference within bf16 rounding (a few ulps of the output)."""
    slots = token_slots_for(case, t, seed=1)
    x, a, b = make_weights(torch.bfloat16, t, seed=1)
    m = build_mapping(slots, torch.bfloat16, kernel=kernel)
    assert m is not None
    y = KERNELS[kernel](x, a, b, m)
    ref = lora_reference(x, a, b, torch.tensor(slots))
    assert y.dtype == torch.bfloat16
    scale = ref.float().abs().max().item()
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= 0.02 * scale, (err, scale)
    assert torch.all(y[torch.tensor([s < 0 for s in slots])] == 0)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", ["identical", "with_base", "subset", "zipf"])
def test_unused_slots_never_change_outputs(kernel: str, case: str) -> None:
    """Slots no token uses may hold anything, NaN included, inside the kernel's slot range (read into padded
    rows) or outside it: outputs stay exact, every padded row is selected away."""
    slots = popularity(case, 64, S - 2)  # the last two slots are never used, and maybe more
    x, a, b = make_weights(torch.float32, 64)
    m = build_mapping(slots, torch.float32, kernel=kernel)
    assert m is not None
    unused = [s for s in range(S) if s not in slots]
    assert len(unused) >= 2
    for s in unused:
        a[s] = float("nan")
        b[s] = float("nan")
    torch.testing.assert_close(KERNELS[kernel](x, a, b, m), lora_reference(x, a, b, torch.tensor(slots)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_runs_in_slot_order_need_no_index(dtype: torch.dtype) -> None:
    """Decode tokens sorted by slot in equal runs are read as a view; the result equals the reference."""
    slots = [s for s in range(S) for _ in range(4)]  # 8 runs of 4
    x, a, b = make_weights(dtype, len(slots))
    m = build_mapping(slots, dtype, kernel="grouped")
    assert m is not None and m.grouped is not None and m.grouped.index is None and m.grouped.rows is None
    ref = lora_reference(x, a, b, torch.tensor(slots))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lora_grouped(x, a, b, m), ref, rtol=tol, atol=tol)
    for near_runs in ([0, 0, 1, 1, 2, -1], [0, 0, 2, 2, 1, 1], [0, 0, 1, 1, 1, 2]):  # base token, order, sizes
        g = build_mapping(near_runs, dtype, kernel="grouped")
        assert g is not None and g.grouped is not None and g.grouped.index is not None


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", ["identical", "uniform", "with_base"])
def test_kernels_accumulate_into_out(kernel: str, case: str) -> None:
    """With `out`, a kernel adds its result into the base layer's output in place (runs or gathered)."""
    for slots in (token_slots_for(case, 24), sorted(token_slots_for(case, 24))):
        x, a, b = make_weights(torch.float32, len(slots))
        m = build_mapping(slots, torch.float32, kernel=kernel)
        assert m is not None
        base = torch.randn(len(slots), OUT)
        out = base.clone()
        assert KERNELS[kernel](x, a, b, m, out) is out
        torch.testing.assert_close(out, base + lora_reference(x, a, b, torch.tensor(slots)), rtol=1e-5, atol=1e-5)


def test_kernel_slots_use_a_range_view_when_it_pads_little() -> None:
    """Active slots that nearly fill a range are read as one view (no weight copy); sparse ones are gathered."""
    m = build_mapping([0, 1, 2, 4, 4], torch.float32, kernel="grouped")  # 4 active in a range of 5
    assert m is not None and m.span == slice(0, 5) and m.active_slots.tolist() == [0, 1, 2, 3, 4]
    assert m.active == (0, 1, 2, 4)
    m = build_mapping([1, 5], torch.float32, kernel="grouped")
    assert m is not None and m.span is None and m.active_slots.tolist() == [1, 5]


def test_reference_matches_a_direct_formula() -> None:
    """The reference itself computes (x @ A[s]^T) @ B[s] per token and 0 for base tokens."""
    x, a, b = make_weights(torch.float32, 3)
    y = lora_reference(x, a, b, torch.tensor([2, -1, 7]))
    torch.testing.assert_close(y[0], x[0] @ a[2].T @ b[2])
    torch.testing.assert_close(y[2], x[2] @ a[7].T @ b[7])
    assert torch.all(y[1] == 0)


# ---- build_mapping ---------------------------------------------------------------------------------------


def test_build_mapping_returns_none_without_adapter_tokens() -> None:
    """No token uses an adapter (all -1, or no tokens): no mapping, the LoRA path is skipped."""
    assert build_mapping([-1, -1, -1], torch.float32) is None
    assert build_mapping([-1], torch.bfloat16, kernel="grouped") is None
    assert build_mapping([], torch.float32) is None


def test_build_mapping_fields() -> None:
    """Active slots are sorted and distinct; the grouped index/padding and the fused groups describe the tokens."""
    slots = [4, -1, 1, 4, 4]
    g = build_mapping(slots, torch.float32, kernel="grouped")
    assert g is not None and g.active_slots.tolist() == [1, 4] and g.token_slots.tolist() == slots
    assert g.kernel == "grouped" and g.fused is None and g.grouped is not None
    assert g.grouped.index is not None and g.grouped.rows is not None and g.grouped.targets is not None
    assert g.grouped.index.tolist() == [[2, 0, 0], [0, 3, 4]]
    assert g.grouped.rows.tolist() == [0, 3, 4, 5] and g.grouped.targets.tolist() == [2, 0, 3, 4]
    f = build_mapping(slots, torch.float32, kernel="fused")
    assert f is not None and f.kernel == "fused" and f.grouped is None and f.fused is not None
    assert f.fused.order.tolist() == [2, 0, 3, 4] and f.fused.groups.tolist() == [[1, 0, 1], [4, 1, 3]]
    assert f.fused.max_group == 3


def test_build_mapping_skips_the_row_selection_when_not_needed() -> None:
    """Equal-size groups have no padded row, so nothing is selected away."""
    g = build_mapping([3, 1, 1, 3], torch.float32, kernel="grouped")
    assert g is not None and g.grouped is not None and g.grouped.index is not None and g.grouped.rows is None
    assert g.grouped.index.tolist() == [[1, 2], [0, 3]]


def test_build_mapping_default_kernel_and_unknown_kernel() -> None:
    """Off the CPU (no fused kernel there) the grouped kernel serves; an unknown kernel name raises."""
    assert build_mapping([0, 1, 1], torch.float32, device="meta").kernel == "grouped"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="bogus"):
        build_mapping([0], torch.float32, kernel="bogus")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tokens_result_does_not_depend_on_its_batch(dtype: torch.dtype) -> None:
    """Added into a base output, an adapter's tokens get the same bits alone (equal runs: the view path) as beside
    base-model tokens and other adapters' (the gather path, with padded rows): in bf16 the two paths once rounded
    base + LoRA differently, and a greedy answer changed with the batch's make-up. (fp32 GEMMs round by their
    blocking, which can follow the batch's shape: there the two agree to float32 rounding, not bit for bit.)"""
    x, a, b = make_weights(dtype, 11, seed=3)
    base = torch.randn(11, OUT, generator=torch.Generator().manual_seed(4)).to(dtype)
    alone = build_mapping([2] * 5, dtype, kernel="grouped")
    mixed = build_mapping([2] * 5 + [-1, -1, 5, 5, 5, 5], dtype, kernel="grouped")
    assert alone is not None and mixed is not None
    assert alone.grouped.index is None and mixed.grouped.rows is not None  # the two paths
    solo = lora_grouped(x[:5], a, b, alone, out=base[:5].clone())
    batched = lora_grouped(x, a, b, mixed, out=base.clone())
    if dtype == torch.bfloat16:
        assert torch.equal(solo, batched[:5])
    else:
        torch.testing.assert_close(solo, batched[:5], rtol=1e-6, atol=1e-6)
    assert torch.equal(batched[5:7], base[5:7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_tokenwise_kernel_gives_a_token_its_bits_in_any_batch(dtype: torch.dtype) -> None:
    """Added into a base output, each token's result is bit-identical alone and among 1 to 200 tokens of other
    adapters and the base model, in fp32 as in bf16 (the grouped kernel differs in fp32: its GEMM's blocking
    follows the padded group's shape), across the kernel's token tiles."""
    x, a, b = make_weights(dtype, 200, seed=5)
    base = torch.randn(200, OUT, generator=torch.Generator().manual_seed(6)).to(dtype)
    slots = popularity("with_base", 200, S, 7)
    solo = torch.stack([lora_tokenwise(x[t:t + 1], a, b, build_mapping([slots[t]], dtype, kernel="tokenwise"),
                                       out=base[t:t + 1].clone())[0] if slots[t] >= 0 else base[t]
                        for t in range(200)])
    g = torch.Generator().manual_seed(8)
    for n in (2, 5, TOKEN_TILE + 3, 200):
        pick = torch.randperm(200, generator=g)[:n]
        m = build_mapping([slots[t] for t in pick.tolist()], dtype, kernel="tokenwise")
        assert m is not None and m.kernel == "tokenwise"
        assert torch.equal(lora_tokenwise(x[pick], a, b, m, out=base[pick].clone()), solo[pick]), n
