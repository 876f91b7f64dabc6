"""The per-query torch attention (models/query_attention.py), the C++ kernel's torch twin for batch-invariant
serving without a compiler: it equals the per-sequence softmax reference in fp32 and bf16, and a query's bits do not
depend on the other queries of the call, their number, or how wide the step's block tables are."""

from __future__ import annotations

import pytest
import torch

from loraplex.models.query_attention import attend_queries
from test_cpu_attention import BS, LENS, SHAPES, assert_close, case, reference, torch_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"h{h}-kv{k}-d{d}" for h, k, d in SHAPES])
@pytest.mark.parametrize("window", [None, 6])
def test_it_matches_the_reference(dtype: torch.dtype, shape: tuple[int, int, int], window: int | None) -> None:
    heads, kv_heads, d = shape
    for lens in LENS:
        q, k, v, tables, ctx = case(heads, kv_heads, d, lens, dtype, seed=len(lens))
        out = torch.full_like(q, float("nan"))
        attend_queries(q, k, v, tables, ctx, BS, window, d**-0.5, out)
        assert_close(out, reference(q, k, v, tables, ctx, window), torch_path(q, k, v, tables, ctx, window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 6])
def test_a_querys_bits_are_its_own(dtype: torch.dtype, window: int | None) -> None:
    """Each query alone (its own table, no padding) against the same query among 1 to 700 others drawn from 40
    sequences of 1 to 118 keys, whose tables pad it to the longest: equal bit for bit. Stale cache rows hold NaN."""
    lens = list(range(1, 120, 3))
    q, k, v, tables, ctx = case(9, 3, 64, lens, dtype)
    used = torch.zeros(k.shape[0], dtype=torch.bool)
    for i, n in enumerate(lens):
        used[(tables[i, :, None] * BS + torch.arange(BS)).view(-1)[:n]] = True
    k[~used], v[~used] = float("nan"), float("nan")
    alone = torch.empty_like(q)
    for i, n in enumerate(lens):
        own = tables[i:i + 1, :-(-n // BS)].contiguous()
        attend_queries(q[i:i + 1], k, v, own, ctx[i:i + 1], BS, window, 0.125, alone[i:i + 1])
    assert alone.isfinite().all()
    g = torch.Generator().manual_seed(1)
    for rows in (1, 2, 17, 64, 700):
        pick = torch.randint(0, len(lens), (rows,), generator=g)
        out = torch.empty(rows, 9, 64, dtype=dtype)
        attend_queries(q[pick].contiguous(), k, v, tables[pick].contiguous(), ctx[pick].contiguous(), BS, window,
                       0.125, out)
        assert torch.equal(out, alone[pick]), rows
