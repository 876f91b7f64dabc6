"""A bf16 checkpoint on a CPU without native bf16 (issue 32, item 3): `--dtype auto` computes in float32 there and
keeps the decoder linears in bf16 as stored, read by the fused kernel that widens them exactly (quant/bf16_weights.py).
The weights are the checkpoint's bits, the answers an fp32 model's (with adapters on top), the memory plan counts the
bytes held and names the format; `--dtype float32`, an fp32 checkpoint, a quantized base, a GPU or a missing kernel
keep today's fp32 weights.

This CPU's class is set for the engine by replacing its dtype resolution with the one an AVX2 CPU gets (the real
cap, ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, resolves the same: tests/test_hardware.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import ALL, assert_same_greedy_answers
from loraplex import LLM
from loraplex.engine import build
from loraplex.engine.memory import module_bytes
from loraplex.hardware import DtypeChoice, resolve_dtype
from loraplex.models.layers import Linear, layer_index
from loraplex.models.loader import decoder_linear_dtypes, load_model
from loraplex.quant import cpu_quant
from loraplex.quant.bf16_weights import FORMAT, keeps_bf16
from loraplex.quant.linear import BF16_WEIGHTS, QuantLinear

pytestmark = pytest.mark.skipif(cpu_quant.library() is None, reason="no C++ compiler to build the kernel")

AVX2_AUTO = DtypeChoice(torch.float32, "auto", "this CPU has no native bf16 (AVX2)", True)
CPU = torch.device("cpu")


@pytest.fixture
def no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "resolve_dtype", lambda name, device: AVX2_AUTO if name == "auto"
                        else resolve_dtype(name, device))


def decoder_linears(llm: LLM) -> dict[str, torch.nn.Module]:
    """Each decoder layer's base linear by its name in the model (under its LoRA wrapper's `base`)."""
    return {n.removesuffix(".base"): m for n, m in llm.engine.runner.model.named_modules()
            if isinstance(m, (Linear, QuantLinear)) and layer_index(n) is not None}


def test_it_answers_as_the_fp32_model_does_from_half_the_bytes(bf16_checkpoint: Path, no_native_bf16: None,
                                                               adapter_factory: Callable[..., Path]) -> None:
    adapter = adapter_factory("bf16w-all", r=8, alpha=16, targets=ALL, seed=12)
    kw: dict[str, object] = {"model": str(bf16_checkpoint), "max_model_len": 256, "lora_modules": {"t": str(adapter)}}
    kept, fp32 = LLM(dtype="auto", **kw), LLM(dtype="float32", **kw)  # type: ignore[arg-type]
    # Every decoder linear holds the checkpoint's bf16 bits, read through the kernel; the rest of the model is fp32.
    stored = load_model(bf16_checkpoint, torch.bfloat16, 256)
    plain = {n: m for n, m in stored.named_modules() if isinstance(m, Linear) and layer_index(n) is not None}
    quant = decoder_linears(kept)
    assert len(quant) == len(plain) == 4 * kept.engine.runner.model.cfg.num_layers
    for name, q in quant.items():
        assert isinstance(q, QuantLinear) and q.method == BF16_WEIGHTS, name
        assert q.bf16_weight.dtype == torch.bfloat16 and torch.equal(q.bf16_weight, plain[name].weight), name
        assert isinstance(q.kernel_parts[0], cpu_quant.Bf16Rows) and q.dtype == torch.float32, name
    assert kept.engine.runner.model.norm.weight.dtype == torch.float32
    assert_same_greedy_answers(fp32, kept, "t")  # with an adapter on every linear too
    # What is resident: the memory plan (/v1/models, /metrics) names the format and counts half the linears' bytes.
    facts, dense = kept.engine.facts, fp32.engine.facts
    assert (facts.dtype, facts.memory.quantization, dense.memory.quantization) == ("float32", FORMAT, "none")
    assert "bf16 decoder linear weights kept in bf16" in facts.dtype_reason
    held = sum(module_bytes(m) for m in quant.values())
    assert 2 * held == sum(module_bytes(m) for m in decoder_linears(fp32).values())
    assert facts.memory.weights == dense.memory.weights - held


def test_only_auto_on_a_cpu_that_computes_in_fp32_keeps_them(bf16_checkpoint: Path, default_model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    assert decoder_linear_dtypes(bf16_checkpoint) == {"BF16"} and decoder_linear_dtypes(default_model_dir) == {"F32"}
    assert keeps_bf16(None, AVX2_AUTO, CPU, bf16_checkpoint)
    assert not keeps_bf16(None, resolve_dtype("float32"), CPU, bf16_checkpoint)  # fp32 weights, as asked
    assert not keeps_bf16(None, AVX2_AUTO, CPU, default_model_dir)  # an fp32 checkpoint
    assert not keeps_bf16("nf4", AVX2_AUTO, CPU, bf16_checkpoint)  # the quantization holds the weights
    assert not keeps_bf16(None, AVX2_AUTO, torch.device("cuda"), bf16_checkpoint)
    native = DtypeChoice(torch.bfloat16, "auto", "this CPU multiplies bf16 natively", True)
    assert not keeps_bf16(None, native, CPU, bf16_checkpoint)  # the whole model is bf16 there
    monkeypatch.setattr(cpu_quant, "library", lambda: None)
    with caplog.at_level(logging.WARNING, logger="loraplex.quant.bf16_weights"):
        assert not keeps_bf16(None, AVX2_AUTO, CPU, bf16_checkpoint)
    assert "widened to float32" in caplog.text and "not built" in caplog.text
