"""The fused C++ CPU kernel (lora/csrc/lora_cpu.cpp) equals `lora_reference`; the engine serves the same
tokens through it as through the torch kernels; without a compiler the torch kernels take over."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from conftest import assert_tokens_bits_are_their_own, ALL, POPULARITY, SHAPES, assert_like_reference, fused_inputs, kernel_case, packed_weights
from loraplex import LLM, SamplingParams, native
from loraplex.lora import cpu_kernel
from loraplex.lora.mapping import build_mapping
from loraplex.lora.ops import lora_apply, lora_reference
from loraplex.lora.slot_layout import SlotLayout

pytestmark = pytest.mark.skipif(cpu_kernel.library() is None, reason="no C++ compiler to build the kernel")


def fused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layout: SlotLayout, slots: list[int],
          out: torch.Tensor | None = None) -> torch.Tensor:
    m, b_compact = fused_inputs(x, b, layout, slots)
    return lora_apply(x, a, b_compact, m, out=out, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", POPULARITY)
@pytest.mark.parametrize("t", [1, 5, 9, 33])
def test_fused_matches_reference(dtype: torch.dtype, shape: str, case: str, t: int) -> None:
    """Every token gets (x @ A^T) @ B of its slot, base tokens exactly nothing; ranks below max_rank and a
    part the adapter leaves alone (rank 0) included (conftest.assert_like_reference for the tolerances)."""
    x, a, b, layout, slots = kernel_case(shape, case, t, dtype)
    assert_like_reference(fused(x, a, b, layout, slots), x, a, b, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adds_into_the_base_output(dtype: torch.dtype) -> None:
    """With `out` the LoRA term is added in place, rounded once (fp32 accumulation) for bf16."""
    a, b, layout = packed_weights([64, 32], 64, 8, [[8, 8], [4, 8]], dtype, seed=3)
    slots = [1, -1, 0, 1, 0]
    x = torch.randn(5, 64).to(dtype)
    base = torch.randn(5, 96).to(dtype)
    out = base.clone()
    assert fused(x, a, b, layout, slots, out=out) is out
    ref = base.float() + lora_reference(x.float(), a.float(), b.float(), torch.tensor(slots)).float()
    assert torch.equal(out[1], base[1])
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol)


def test_fused_kernel_refuses_the_block_diagonal_layout() -> None:
    """Layout and kernel must agree: the fused kernel never reads a block-diagonal B, nor torch a compact one."""
    a, b, layout = packed_weights([32], 32, 4, [[4]], torch.float32, seed=0)
    x = torch.randn(2, 32)
    block_diagonal = dataclasses.replace(layout, shape=dataclasses.replace(layout.shape, compact=False))
    with pytest.raises(ValueError, match="compact"):
        lora_apply(x, a, b, build_mapping([0, 0], torch.float32, kernel="fused"), layout=block_diagonal)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compact"):
        lora_apply(x, a, b, build_mapping([0, 0], torch.float32, kernel="grouped"), layout=layout)  # type: ignore[arg-type]


def test_default_kernel_on_cpu_is_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32/bfloat16 on CPU map to the fused kernel; without it, to the torch kernels."""
    assert build_mapping([0, 1], torch.bfloat16).kernel == "fused"  # type: ignore[union-attr]
    assert build_mapping([0, 1], torch.float16).kernel != "fused"  # type: ignore[union-attr]
    monkeypatch.setattr(cpu_kernel, "supported", lambda dtype, device: False)
    assert build_mapping([0, 1], torch.float32).kernel == "grouped"  # type: ignore[union-attr]


@pytest.fixture
def no_cached_library() -> Iterator[None]:
    cpu_kernel.library.cache_clear()
    yield
    cpu_kernel.library.cache_clear()


def test_without_a_compiler_the_torch_kernels_serve(monkeypatch: pytest.MonkeyPatch, no_cached_library: None,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(native, "compiler", lambda: None)
    assert cpu_kernel.library() is None and not cpu_kernel.supported(torch.float32, "cpu")
    assert "no C++ compiler" in caplog.text


def test_a_failed_build_is_reported_and_the_torch_kernels_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 no_cached_library: None,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", broken)
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    assert cpu_kernel.library() is None
    assert "failed to build broken.cpp" in caplog.text


def test_the_build_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Built once into the cache, then reused; another source (or flags) is another build."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    cxx = native.compiler()
    assert cxx is not None
    path = native.build(cpu_kernel.SOURCE, cxx)
    assert path.is_file() and path.parent == tmp_path / "kernels" and path.stat().st_mode & 0o044
    mtime = path.stat().st_mtime_ns
    assert native.build(cpu_kernel.SOURCE, cxx) == path and path.stat().st_mtime_ns == mtime
    changed = tmp_path / "lora_cpu.cpp"
    changed.write_text(cpu_kernel.SOURCE.read_text() + "\n// another source\n")
    assert native.build(changed, cxx) != path
    assert native.build(cpu_kernel.SOURCE, cxx, [*native.machine_flags(), "-DLORAPLEX_OTHER_FLAGS"]) != path


@pytest.mark.parametrize("extra", [["-mno-avx512bf16"], ["-mno-avx512f"]], ids=["avx512-no-bf16", "avx2"])
def test_builds_for_other_cpus_match_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, extra: list[str]) -> None:
    """The kernel as built for CPUs without AVX512-BF16 (bf16 by widening pairs, fp32 FMAs) and for AVX2-only
    CPUs (8-lane vectors), built and checked here whatever this CPU has, in both dtypes."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    cxx = native.compiler()
    assert cxx is not None
    lib = cpu_kernel.load(native.build(cpu_kernel.SOURCE, cxx, [*native.FLAGS, *extra]))
    for dtype in (torch.bfloat16, torch.float32):
        for shape in SHAPES:
            for case in POPULARITY:
                x, a, b, layout, slots = kernel_case(shape, case, 9, dtype)
                m, b_compact = fused_inputs(x, b, layout, slots)
                out = torch.zeros(x.shape[0], sum(layout.part_sizes), dtype=dtype)
                cpu_kernel.call(lib, x, a, b_compact, m.fused.order, m.fused.groups, layout.ranks, layout.offsets,
                                layout.max_rank, out)
                assert_like_reference(out, x, a, b, slots)


def test_bad_arguments_raise_before_the_kernel_runs() -> None:
    x, a, b, layout, slots = kernel_case("qkv", "distinct", 4, torch.float32)
    m, b_compact = fused_inputs(x, b, layout, slots)
    out = torch.zeros(4, sum(layout.part_sizes))
    with pytest.raises(ValueError, match="B \\(3, 100\\)"):
        cpu_kernel.lora_add(x, a, b_compact[:, :100].contiguous(), m.fused.order, m.fused.groups, layout.ranks, layout.offsets,
                            layout.max_rank, out)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_kernel.lora_add(x.bfloat16(), a, b_compact, m.fused.order, m.fused.groups, layout.ranks, layout.offsets,
                            layout.max_rank, out)


def test_engine_tokens_equal_with_fused_and_torch_kernels(adapter_factory: Callable[..., Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed batch (two all-linear adapters of ranks 8 and 16, and the base) decodes to the same greedy
    tokens, with logits within fp32 tolerance, whichever kernel runs the LoRA layers."""
    adapters = {"r8": str(adapter_factory("kern_r8", r=8, alpha=16, targets=ALL, seed=31)),
                "r16": str(adapter_factory("kern_r16", r=16, alpha=16, targets=ALL, seed=32))}
    prompts = ["Write a haiku about rivers.", "List three prime numbers.", "Say hello."]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    names: list[str | None] = ["r8", "r16", None]

    def run() -> tuple[list[list[int]], torch.Tensor]:
        llm = LLM(dtype="float32", max_loras=2, lora_modules=adapters)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, names)]
        return tokens, llm.engine.prompt_logits(llm.tokenizer.encode(prompts[0]), adapter="r8")

    fused_tokens, fused_logits = run()
    monkeypatch.setattr(cpu_kernel, "supported", lambda dtype, device: False)
    torch_tokens, torch_logits = run()
    assert fused_tokens == torch_tokens
    torch.testing.assert_close(fused_logits, torch_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_tokens_bits_do_not_depend_on_the_tokens_beside_it(dtype: torch.dtype, shape: str) -> None:
    """Batch invariance of the fused kernel (issue 41): each token added into a base output has the bits it has
    alone, in batches of 1 to 64 tokens mixing the three slots and base tokens in runs of every length."""
    assert_tokens_bits_are_their_own(fused, shape, dtype, 64, (2, 7, 16, 33, 64))
