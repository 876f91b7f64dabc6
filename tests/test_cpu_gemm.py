"""The prepacked oneDNN linear (bf16 and fp32, CPU) equals its reference F.linear, and a prepacked model equals an
unpacked one: bit for bit in bf16, to fp32 rounding in fp32 (oneDNN sums in another order than MKL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraplex.models import cpu_gemm, row_tiles
from loraplex.models.layers import Linear
from loraplex.models.loader import load_model

DTYPES = [pytest.param(dt, marks=pytest.mark.skipif(not cpu_gemm.available(dt), reason=f"no oneDNN prepacked {dt} linear "
                                                     "in this torch build or on this CPU class"))
          for dt in (torch.bfloat16, torch.float32)]


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    if ref.dtype == torch.bfloat16:
        assert torch.equal(ours, ref)
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows: int, bias: bool, dtype: torch.dtype) -> None:
    """F.linear's result for any number of rows (the packing hint is 64), with and without bias."""
    g = torch.Generator().manual_seed(rows)
    layer = Linear(96, [("q", 64), ("k", 32)], bias=bias).to(dtype)
    layer.weight.data.copy_(torch.randn(96, 96, generator=g))
    if bias:
        assert layer.bias is not None
        layer.bias.data.copy_(torch.randn(96, generator=g))
    w = layer.weight.detach().clone()
    x = torch.randn(rows, 96, generator=g).to(dtype)
    ref = F.linear(x, w, layer.bias)
    assert layer.prepack() and layer.packed is not None
    assert layer.weight.numel() == 0  # the plain copy is freed
    assert_same(layer(x), ref)
    assert not layer.prepack()  # once only


def test_fp16_layers_are_not_packed() -> None:
    layer = Linear(8, [("q", 8)]).to(torch.float16)
    assert not layer.prepack() and layer.packed is None and layer.weight.shape == (8, 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepacked_default_model_equals_unpacked(default_model_dir: Path, dtype: torch.dtype) -> None:
    """Every linear of the default model, and the tied LM head, give the same result packed and plain."""
    packed, plain = load_model(default_model_dir, dtype, 64), load_model(default_model_dir, dtype, 64)
    packed.prepack()
    cfg = packed.cfg
    assert cfg.tie_word_embeddings and packed.head_packed is not None and plain.head_packed is None
    g = torch.Generator().manual_seed(0)
    pairs = [(a, b) for a, b in zip(packed.modules(), plain.modules()) if isinstance(a, Linear)]
    assert len(pairs) == 4 * cfg.num_layers and all(a.packed is not None and b.packed is None for a, b in pairs)
    for a, b in pairs:
        x = torch.randn(5, a.in_features, generator=g).to(dtype)
        assert_same(a(x), b(x))
    h = torch.randn(4, cfg.hidden_size, generator=g).to(dtype)
    assert_same(cpu_gemm.linear(h, packed.head_packed, None), F.linear(h, plain.embed_tokens.weight))


# ---- batch invariance: a row's bits do not depend on the rows beside it (issue 41) ---------------------------

SHAPES = {"qkv": (576, 960), "down": (1536, 576), "head": (576, 49152)}  # the default model's (in, out) kinds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_tiled_rows_get_their_solo_bits_at_every_batch_size(dtype: torch.dtype, shape: str) -> None:
    """In the tiles `invariant_tiling` finds, each row of a call of M rows (random M from 1 to 64, and long
    prefill-sized calls) has the bits it has alone, with and without bias."""
    in_f, out_f = SHAPES[shape]
    g = torch.Generator().manual_seed(out_f)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    packed = cpu_gemm.pack(w)
    tiling = cpu_gemm.invariant_tiling(packed)
    tile = tiling.rows
    assert 2 <= tile <= row_tiles.MAX_TILE
    x = torch.randn(200, in_f, generator=g).to(dtype)
    for b in (None, bias):
        alone = torch.cat([cpu_gemm.linear(x[i:i + 1], packed, b, tiling) for i in range(x.shape[0])])
        sizes = sorted({1, 2, tile, tile + 1, 2 * tile + 1, 200, *torch.randint(1, 65, (6,), generator=g).tolist()})
        for m in sizes:
            start = int(torch.randint(0, 200 - m + 1, (1,), generator=g))
            assert torch.equal(cpu_gemm.linear(x[start:start + m], packed, b, tiling), alone[start:start + m]), m
        torch.testing.assert_close(alone.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)


def test_the_probe_finds_where_the_order_of_a_sum_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 kernel that sums each row's two halves apart from 21 rows on (as a GEMM that blocks K by the row
    count): the probe gives tiles of 20, though random rows hide the change (the sums differ in fp32 bits that
    rounding to bf16 drops); a kernel that does so for one row only gets tiles of MAX_TILE and lone rows padded."""
    w = (torch.randn(40, 64, generator=torch.Generator().manual_seed(1)) / 8).bfloat16()

    def kernel(split: Callable[[int], bool]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
        def call(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if not split(x.shape[0]):
                return _sequential(x, w).bfloat16()
            return (_sequential(x[:, :32], w[:, :32]) + _sequential(x[:, 32:], w[:, 32:])).bfloat16()
        return call

    x = torch.randn(21, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    from_21 = kernel(lambda m: m >= 21)
    assert torch.equal(from_21(x, w, None), torch.cat([from_21(x[i:i + 1], w, None) for i in range(21)]))
    for split, expected in ((lambda m: m >= 21, row_tiles.Tiling(20, False)),
                            (lambda m: m == 1, row_tiles.Tiling(row_tiles.MAX_TILE, True)),
                            (lambda m: False, row_tiles.Tiling(row_tiles.MAX_TILE, False))):
        monkeypatch.setattr(cpu_gemm, "_call", kernel(split))
        monkeypatch.setattr(row_tiles, "_tilings", {})
        assert cpu_gemm.invariant_tiling(w) == expected


def _sequential(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T, each sum taken term by term in K order (float32 rounding at every step)."""
    out = torch.zeros(x.shape[0], w.shape[0])
    for k in range(x.shape[1]):
        out += x[:, k, None] * w[:, k]
    return out
