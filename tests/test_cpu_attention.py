"""The C++ paged decode attention equals its torch reference (PagedAttention's matmul path, and a per-sequence
softmax written out here), in fp32 and bf16, for the head groupings, head sizes, windows and context lengths the
models use; as built for this CPU and for AVX2-only CPUs; and an engine decodes the same tokens with it or without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex import LLM, SamplingParams, native
from loraplex.models import cpu_attention
from loraplex.models.attention import PagedAttention
from loraplex.models.batch import AttentionGroup

pytestmark = pytest.mark.skipif(cpu_attention.library() is None, reason="no C++ compiler to build the kernel")

BS = 4  # small blocks: sequences span many, scattered over the cache


def case(heads: int, kv_heads: int, d: int, lens: list[int], dtype: torch.dtype, seed: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, D], caches [S, KVH, D], block tables [B, NB] (blocks scattered, padding 0), context lengths."""
    g = torch.Generator().manual_seed(seed)
    nb = max((n + BS - 1) // BS for n in lens)
    blocks = torch.randperm(3 * len(lens) * nb, generator=g)[: len(lens) * nb].view(len(lens), nb)
    for i, n in enumerate(lens):  # padding past each sequence's blocks, as the runner lays tables out
        blocks[i, (n + BS - 1) // BS :] = 0
    slots = 3 * len(lens) * nb * BS
    k = torch.randn(slots, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(slots, kv_heads, d, generator=g).to(dtype)
    q = (2 * torch.randn(len(lens), heads, d, generator=g)).to(dtype)
    return q, k, v, blocks, torch.tensor(lens, dtype=torch.long)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """Per sequence, in fp32: the keys at positions [max(0, n - window), n), softmax(q k^T / sqrt(D)) v."""
    b, h, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, d)
    for i in range(b):
        n = int(lens[i])
        pos = torch.arange(max(0, n - window) if window else 0, n)
        slots = tables[i, pos // BS] * BS + pos % BS
        kk = k[slots].float().repeat_interleave(group, dim=1)  # [N, H, D]
        vv = v[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), kk) * d**-0.5
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), vv)
    return out


def torch_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
               window: int | None) -> torch.Tensor:
    """The model's own torch path for a decode group (masks as the runner builds them)."""
    b, h, d = q.shape
    attn = PagedAttention(h, k.shape[1], d, window)
    attn.k_cache, attn.v_cache, attn.block_size = k, v, BS
    kpos = torch.arange(tables.shape[1] * BS)
    qpos = lens - 1
    m = kpos[None, :] <= qpos[:, None]
    if window:
        m &= kpos[None, :] > qpos[:, None] - window
    group = AttentionGroup(token_index=None, start=0, num_seqs=b, q_len=1, block_tables=tables,
                           masks={window: (~m)[:, None, None, None, :]}, valid=None, context_lens=lens)
    out = torch.empty_like(q)
    attn._attend_group(q, out, group)
    return out


def assert_close(ours: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor) -> None:
    """fp32: to 1e-5. bf16: no further from the fp32 reference than the torch path in bf16 (plus one rounding)."""
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        return
    mine, theirs = (ours.float() - ref).abs().max().item(), (torch_out.float() - ref).abs().max().item()
    assert mine <= max(1.5 * theirs, 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()), (mine, theirs)


SHAPES = [(9, 3, 64), (8, 8, 64), (32, 8, 128), (12, 1, 72), (8, 2, 36), (16, 1, 16)]  # (H, KVH, D)
LENS = [[1], [17, 5, 100, 2], [33, 64, 3, 48, 16, 7, 90, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"h{h}-kv{k}-d{d}" for h, k, d in SHAPES])
@pytest.mark.parametrize("window", [None, 6])
def test_kernel_matches_reference(dtype: torch.dtype, shape: tuple[int, int, int], window: int | None) -> None:
    heads, kv_heads, d = shape
    for lens in LENS:
        q, k, v, tables, ctx = case(heads, kv_heads, d, lens, dtype, seed=len(lens))
        out = torch.full_like(q, float("nan"))
        cpu_attention.paged_decode(q, k, v, tables, ctx, BS, window, d**-0.5, out)
        assert_close(out, reference(q, k, v, tables, ctx, window), torch_path(q, k, v, tables, ctx, window))


@pytest.mark.slow
def test_the_avx2_build_matches_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The kernel as built for AVX2-only CPUs (8-lane vectors), checked here whatever this CPU has."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    cxx = native.compiler()
    assert cxx is not None
    lib = cpu_attention.load(native.build(cpu_attention.SOURCE, cxx, [*native.FLAGS, "-mno-avx512f"]))
    for dtype in (torch.float32, torch.bfloat16):
        for heads, kv_heads, d in SHAPES:
            q, k, v, tables, ctx = case(heads, kv_heads, d, LENS[2], dtype, seed=d)
            out = torch.empty_like(q)
            cpu_attention.call(lib, q, k, v, tables, ctx, BS, 6, d**-0.5, out)
            assert_close(out, reference(q, k, v, tables, ctx, 6), torch_path(q, k, v, tables, ctx, 6))


def test_what_the_kernel_does_not_handle_is_refused() -> None:
    assert cpu_attention.handles(9, 3, 64) and not cpu_attention.handles(10, 3, 64)
    assert not cpu_attention.handles(40, 4, 64) and not cpu_attention.handles(8, 8, 512)
    q, k, v, tables, ctx = case(9, 3, 64, [5], torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_attention.paged_decode(q.bfloat16(), k, v, tables, ctx, BS, None, 0.125, torch.empty_like(q))
    q, k, v, tables, ctx = case(40, 4, 64, [5], torch.float32)
    with pytest.raises(ValueError, match="not handled"):
        cpu_attention.paged_decode(q, k, v, tables, ctx, BS, None, 0.125, torch.empty_like(q))


@pytest.mark.slow
def test_engine_decodes_the_same_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy tokens equal and decode logits within fp32 tolerance, kernel or torch path, over a batch whose
    sequences have different lengths."""
    prompts = ["Write a haiku about rivers.", "List three prime numbers, then explain why each is prime.", "Hi."]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run() -> tuple[list[list[int]], bool]:
        llm = LLM(dtype="float32")
        runner = llm.engine.runner
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)], runner.per_query_attention

    kernel_tokens, per_query = run()
    assert per_query  # every layer attends through the kernel, so the runner builds no masks
    monkeypatch.setattr(cpu_attention, "supported", lambda dtype, device: False)
    torch_tokens, per_query = run()
    assert not per_query and kernel_tokens == torch_tokens
