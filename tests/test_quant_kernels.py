"""The fused quantized linear kernels (quant/cpu_quant.py, quant/csrc/quant_cpu.cpp) against their reference, F.linear
on the dequantized weight: NF4 and FP4, with and without double quantization, int8 with per-row scales, GGUF's Q4_0,
Q4_1 and Q8_0 blocks (against gguf-py's dequantize) and bf16 weights read widened, fp32 and bf16, over odd shapes and
block remainders (K odd, rows starting inside a byte and inside a block) and every batch size from 1 to 128. They decode exactly the
weights bitsandbytes, QuantLinear and gguf-py dequantize, a row's result has the same bits in any batch, and the AVX2
build agrees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraplex import native
from loraplex.models.layers import Linear
from loraplex.quant import cpu_quant
from loraplex.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(cpu_quant.library() is None, reason="no C++ compiler to build the kernel")
bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(7, 70), (33, 64), (5, 129), (3, 31), (9, 33), (40, 576)]  # (N, K)
KINDS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False), ("bf16", False)]


def quantized(n: int, k: int, dtype: torch.dtype, kind: tuple[str, bool], seed: int = 0
              ) -> tuple[cpu_quant.Codes | cpu_quant.Int8Rows | cpu_quant.Bf16Rows, torch.Tensor]:
    """The kernel's view of a random [N, K] weight quantized by bitsandbytes (or stored in bf16), and its dequantized
    weight in `dtype`."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if kind[0] == "bf16":  # a bf16 checkpoint's weight, whatever the model computes in
        stored = w.bfloat16()
        return cpu_quant.Bf16Rows(stored), stored.to(dtype)
    if kind[0] == "int8":
        base = Linear(k, [("w", n)]).to(dtype)
        base.weight.data.copy_(w)
        q = QuantLinear(base, "int8")
        return cpu_quant.Int8Rows(q.int8_weight, q.int8_scale), q.dequantize()
    codes, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=kind[1], quant_type=kind[0],
                                      quant_storage=torch.uint8)
    return cpu_quant.Codes.of(codes, state), bnbf.dequantize_4bit(codes, state).to(dtype)


def run(x: torch.Tensor, w: cpu_quant.Codes | cpu_quant.Int8Rows | cpu_quant.GgufRows,
        bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.full((x.shape[0], w.n), float("nan"), dtype=x.dtype)
    cpu_quant.linear(x, w, bias, out)
    return out


def assert_like_reference(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """fp32: to float32 rounding. bf16: no further from the fp32 result than F.linear in bf16 is (plus an ulp)."""
    exact = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-4)
        return
    mine = (out.float() - exact).abs().max().item()
    theirs = (F.linear(x, w, bias).float() - exact).abs().max().item()
    assert mine <= max(1.5 * theirs, 2 * torch.finfo(torch.bfloat16).eps * exact.abs().max().item()), (mine, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS, ids=[f"{q}{'-dq' * d}" for q, d in KINDS])
def test_it_decodes_exactly_the_weights_that_are_dequantized(dtype: torch.dtype, kind: tuple[str, bool]) -> None:
    for n, k in SHAPES:
        w, ref = quantized(n, k, dtype, kind, seed=n)
        assert torch.equal(cpu_quant.dequantize(w, dtype), ref), (n, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS, ids=[f"{q}{'-dq' * d}" for q, d in KINDS])
def test_it_matches_the_reference_at_every_batch_size(dtype: torch.dtype, kind: tuple[str, bool]) -> None:
    """Every M from 1 to 128 for one shape, a few for the others, with and without bias."""
    for n, k in SHAPES:
        w, ref = quantized(n, k, dtype, kind, seed=k)
        g = torch.Generator().manual_seed(n * k)
        bias = torch.randn(n, generator=g).to(dtype)
        x = torch.randn(128, k, generator=g).to(dtype)
        for m in range(1, 129) if (n, k) == (9, 33) else (1, 2, 5, 17, 128):
            b = bias if m % 2 else None
            assert_like_reference(run(x[:m], w, b), x[:m], ref, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["nf4", "int8", "bf16"])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(dtype: torch.dtype, method: str) -> None:
    """Batch invariance by construction (issue 41, issue 32 item 2): each of 128 rows alone has the bits it has in
    calls of 2 to 128 rows starting anywhere, whatever the thread count."""
    w, _ = quantized(40, 576, dtype, (method, method == "nf4"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 576, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    alone = torch.cat([run(x[i:i + 1], w, bias) for i in range(128)])
    for m in (2, 3, 4, 5, 7, 16, 33, 64, 127, 128):
        start = int(torch.randint(0, 128 - m + 1, (1,), generator=g))
        assert torch.equal(run(x[start:start + m], w, bias), alone[start:start + m]), m
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(run(x, w, bias), alone)
    finally:
        torch.set_num_threads(threads)


def test_a_packed_layers_parts_go_to_their_own_columns() -> None:
    """Two matrices (as q and k of a packed layer, quantized apart) written side by side into one output."""
    (wq, rq), (wk, rk) = quantized(6, 64, torch.float32, ("nf4", False), 1), quantized(10, 64, torch.float32,
                                                                                        ("nf4", False), 2)
    x = torch.randn(3, 64)
    out = torch.empty(3, 16)
    cpu_quant.linear(x, wq, None, out, 0)
    cpu_quant.linear(x, wk, None, out, 6)
    torch.testing.assert_close(out, F.linear(x, torch.cat([rq, rk])), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_before_any_pointer_is_read() -> None:
    w, _ = quantized(6, 64, torch.float32, ("nf4", False))
    with pytest.raises(ValueError, match="quantized linear"):
        cpu_quant.linear(torch.randn(2, 63), w, None, torch.empty(2, 6))  # K does not match
    with pytest.raises(ValueError, match="quantized linear"):
        cpu_quant.linear(torch.randn(2, 64), w, None, torch.empty(2, 5))  # too few columns
    with pytest.raises(ValueError, match="quantized linear"):
        cpu_quant.linear(torch.randn(2, 64).bfloat16(), w, None, torch.empty(2, 6))  # dtypes differ
    assert isinstance(w, cpu_quant.Codes)
    with pytest.raises(ValueError, match=r"4-bit codes for \[6, 64\]"):  # the weight is checked once, when made
        dataclasses.replace(w, codes=w.codes[:-1])
    with pytest.raises(ValueError, match="int8 rows"):
        cpu_quant.Int8Rows(torch.zeros(6, 64, dtype=torch.int8), torch.ones(5))
    with pytest.raises(ValueError, match=r"bf16 rows: .* got \(6, 64\) torch.float32"):
        cpu_quant.Bf16Rows(torch.zeros(6, 64))
    with pytest.raises(ValueError, match="bf16 rows"):
        cpu_quant.Bf16Rows(torch.zeros(64, 6, dtype=torch.bfloat16).t())  # not contiguous


GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
GGUF_SHAPES = [(7, 32), (33, 96), (40, 576), (5, 160)]  # (N, K): K whole blocks of 32


def gguf_quantized(n: int, k: int, kind: str, seed: int = 0) -> tuple[cpu_quant.GgufRows, torch.Tensor]:
    """A random [N, K] weight in a GGUF block format as gguf-py writes it, and its fp32 weight as gguf-py reads it
    (what transformers loads a GGUF with)."""
    gq = pytest.importorskip("gguf.quants")
    qtype = pytest.importorskip("gguf").GGMLQuantizationType(GGUF_TYPES[kind])
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).numpy()
    data = torch.from_numpy(gq.quantize(w, qtype).copy())
    return cpu_quant.GgufRows(data, GGUF_TYPES[kind], n, k), torch.from_numpy(gq.dequantize(data.numpy(), qtype).copy())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_gguf_blocks_decode_as_gguf_py_reads_them_and_multiply_like_the_reference(dtype: torch.dtype, kind: str) -> None:
    """Q4_0, Q4_1 and Q8_0 as shipped: the decoded weights are gguf-py's bit for bit (rounded to the dtype), a
    subnormal fp16 scale included; results equal F.linear on them at batch 1 to 40; a row has its solo bits in any
    batch; and a row map reads stored rows in its order."""
    for n, k in GGUF_SHAPES:
        w, ref = gguf_quantized(n, k, kind, seed=n + k)
        w.data[0, :2] = torch.tensor([1, 0], dtype=torch.uint8)  # the first block's d: fp16 2^-24, subnormal
        ref = torch.from_numpy(pytest.importorskip("gguf.quants").dequantize(
            w.data.numpy(), pytest.importorskip("gguf").GGMLQuantizationType(GGUF_TYPES[kind])).copy())
        assert torch.equal(cpu_quant.dequantize(w, dtype), ref.to(dtype)), (n, k)
        g = torch.Generator().manual_seed(n * k)
        x = torch.randn(40, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        for m in (1, 2, 3, 4, 5, 9, 40):
            assert_like_reference(run(x[:m], w, bias), x[:m], ref.to(dtype), bias)
        alone = torch.cat([run(x[i:i + 1], w, bias) for i in range(40)])
        assert torch.equal(run(x, w, bias), alone)
        perm = torch.randperm(n, generator=g)
        mapped = cpu_quant.GgufRows(w.data, w.type, n, k, perm)
        assert torch.equal(cpu_quant.dequantize(mapped, dtype), ref[perm].to(dtype))
        assert torch.equal(run(x[:3], mapped, None), run(x[:3], w, None)[:, perm])


def test_bad_gguf_rows_are_refused_when_made() -> None:
    w, _ = gguf_quantized(4, 64, "Q4_1")
    with pytest.raises(ValueError, match=r"GGUF rows for \[4, 64\]"):
        cpu_quant.GgufRows(w.data, 6, 4, 64)  # Q5_0: not read here
    with pytest.raises(ValueError, match="GGUF rows"):
        cpu_quant.GgufRows(w.data[:, :-1].contiguous(), w.type, 4, 64)  # a row is not whole blocks
    with pytest.raises(ValueError, match="GGUF rows"):
        cpu_quant.GgufRows(w.data, w.type, 4, 64, torch.tensor([0, 1, 2, 4]))  # the map reads past the stored rows


@pytest.mark.slow
@pytest.mark.parametrize("build", ["avx2", "x86-64"])
def test_the_avx2_and_plain_x86_builds_match_the_reference(build: str, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """The kernel as built for AVX2-only CPUs (8-lane vectors, its own code lookup) and for an x86-64 CPU without AVX
    (no vector lookup, GGUF's scalar decode and fp16 conversion), checked here whatever this CPU has: the same
    decoded weights, results like the reference, and rows' bits independent of the batch."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    cxx = native.compiler()
    assert cxx is not None
    flags = [*native.FLAGS, "-mno-avx512f"] if build == "avx2" else \
        [f for f in native.FLAGS if f != "-march=native"] + ["-march=x86-64"]
    lib = cpu_quant.load(native.build(cpu_quant.SOURCE, cxx, flags))
    monkeypatch.setattr(cpu_quant, "library", lambda: lib)
    for dtype in DTYPES:
        for kind in KINDS:
            for n, k in SHAPES:
                w, ref = quantized(n, k, dtype, kind, seed=n + k)
                assert torch.equal(cpu_quant.dequantize(w, dtype), ref), (dtype, kind, n, k)
                x = torch.randn(37, k).to(dtype)
                out = run(x, w, None)
                assert_like_reference(out, x, ref, None)
                assert torch.equal(torch.cat([run(x[i:i + 1], w, None) for i in range(37)]), out)
        for kind in GGUF_TYPES:
            for n, k in GGUF_SHAPES:
                w, ref = gguf_quantized(n, k, kind, seed=n + k)
                assert torch.equal(cpu_quant.dequantize(w, dtype), ref.to(dtype)), (dtype, kind, n, k)
                x = torch.randn(37, k).to(dtype)
                out = run(x, w, None)
                assert_like_reference(out, x, ref.to(dtype), None)
                assert torch.equal(torch.cat([run(x[i:i + 1], w, None) for i in range(37)]), out)
