"""The prepacked oneDNN linear (bf16 and fp32, CPU) equals its reference F.linear, and a prepacked model equals an
unpacked one: bit for bit in bf16, to fp32 rounding in fp32 (oneDNN sums in another order than MKL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraplex.models import cpu_gemm
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
