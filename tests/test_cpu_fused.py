"""The fused C++ norm, rotary and activation ops equal the torch code they replace (RMSNorm.reference,
RotaryEmbedding.reference, silu * up): fp32 to rounding, bf16 to the bit but for a few elements whose sum is
taken in another order; as built for this CPU and for AVX2-only CPUs; and the model decodes the same tokens
with them or without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraplex import LLM, SamplingParams, native
from loraplex.models import cpu_fused
from loraplex.models.config import RopeConfig
from loraplex.models.layers import RMSNorm
from loraplex.models.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(cpu_fused.library() is None, reason="no C++ compiler to build the kernels")

DTYPES = [torch.float32, torch.bfloat16]


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: to 1e-5. bf16: at most 1% of elements one bf16 unit apart (a sum of squares in another order
    may round the other way), none further."""
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        return
    diff = (ours.float() - ref.float()).abs()
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1e-30)
    assert (diff > ulp).float().mean() <= 0.01 and bool((diff <= 2 * ulp + 1e-30).all())


@pytest.fixture(params=["native", "avx2"])
def lib(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """This CPU's build, and one for AVX2-only CPUs (8-lane vectors), checked here whatever this CPU has."""
    if request.param == "native":
        return cpu_fused.library()
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    cxx = native.compiler()
    assert cxx is not None
    return cpu_fused.load(native.build(cpu_fused.SOURCE, cxx, [*native.FLAGS, "-mno-avx512f"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [576, 45, 64])
def test_add_rmsnorm(lib, dtype: torch.dtype, d: int) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(d)
    norm = RMSNorm(d, 1e-5)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(d, generator=g))
    norm = norm.to(dtype)
    x, residual = (3 * torch.randn(7, d, generator=g)).to(dtype), torch.randn(7, d, generator=g).to(dtype)
    plain = cpu_fused.add_rmsnorm(x, x.clone(), norm.weight, norm.eps, add=False, lib=lib)
    assert_same(plain, norm.reference(x))
    summed = residual.clone()
    out = cpu_fused.add_rmsnorm(x, summed, norm.weight, norm.eps, add=True, lib=lib)
    assert torch.equal(summed, x + residual)  # the residual stream, rounded as torch rounds the add
    assert_same(out, norm.reference(x + residual))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(9, 3, 64), (4, 4, 128), (2, 1, 40)])
def test_rope(lib, dtype: torch.dtype, heads: int, kv_heads: int, d: int) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(d)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), d, 256).to(dtype)
    t = 11
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d + 8, generator=g).to(dtype)[:, 4:-4]  # strided rows
    positions = torch.randint(0, 256, (t,), generator=g)
    q, k = cpu_fused.rope(qkv, heads, kv_heads, d, positions, rotary.cos, rotary.sin, lib=lib)
    q_size, kv_size = heads * d, kv_heads * d
    ref_q, ref_k = rotary.reference(positions, qkv[:, :q_size].reshape(t, heads, d),
                                    qkv[:, q_size : q_size + kv_size].reshape(t, kv_heads, d))
    assert q.is_contiguous() and k.is_contiguous()
    assert_same(q, ref_q)
    assert_same(k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1536, 100])
def test_silu_mul(lib, dtype: torch.dtype, width: int) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(width)
    gate_up = (4 * torch.randn(5, 2 * width, generator=g)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturating and zero inputs
    gate, up = gate_up.split(width, dim=-1)
    assert_same(cpu_fused.silu_mul(gate_up, lib=lib), F.silu(gate) * up)


@pytest.mark.slow
def test_model_decodes_the_same_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy tokens equal, fused ops or torch ops, in fp32 over a batch of different lengths."""
    prompts = ["Write a haiku about rivers.", "List three prime numbers, then explain why each is prime.", "Hi."]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run() -> list[list[int]]:
        llm = LLM(dtype="float32", enable_lora=False, max_model_len=256, kv_cache_memory=32 << 20)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    fused = run()
    monkeypatch.setattr(cpu_fused, "supported", lambda x: False)
    assert run() == fused


def test_bad_arguments_are_refused() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="add_rmsnorm"):
        cpu_fused.add_rmsnorm(x, x.t().contiguous(), torch.ones(8), 1e-5, add=True)
    with pytest.raises(ValueError, match="silu_mul"):
        cpu_fused.silu_mul(torch.randn(3, 7))
