"""A bf16 checkpoint on a CPU without native bf16 (issue 32, item 3): `--dtype auto` computes in float32 there and
keeps the linears (the LM head included) and the embeddings in bf16 as stored, read by the fused kernel that widens
them exactly (quant/bf16_weights.py). The weights are the checkpoint's bits, the answers an fp32 model's (with adapters on top), the memory plan counts the
bytes held and names the format; `--dtype float32`, an fp32 checkpoint, a quantized base, a GPU or a missing kernel
keep today's fp32 weights.

This CPU's class is set for the engine by replacing its dtype resolution with the one an AVX2 CPU gets (the real
cap, ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, resolves the same: tests/test_hardware.py)."""

from __future__ import annotations

import json
import logging
import shutil
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
from loraplex.models.loader import load_model, stored_dtypes
from loraplex.quant import cpu_quant
from loraplex.quant.bf16_weights import FORMAT, Bf16Embedding, bf16_storage, keep_bf16_weights
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
    model = kept.engine.runner.model
    assert model.norm.weight.dtype == torch.float32
    # The tied LM head and the embeddings: one bf16 tensor, the checkpoint's, through the kernel and widened lookups.
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.method == BF16_WEIGHTS
    assert torch.equal(model.lm_head.bf16_weight, stored.embed_tokens.weight) and model.head_packed is None
    assert isinstance(model.embed_tokens, Bf16Embedding) and model.embed_tokens.rows is model.lm_head.bf16_weight
    ids = torch.randint(0, model.cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.embed_tokens(ids), stored.embed_tokens(ids).float())
    assert_same_greedy_answers(fp32, kept, "t")  # with an adapter on every linear too
    # What is resident: the memory plan (/v1/models, /metrics) names the format and counts half the linears' bytes,
    # and one bf16 copy of the embeddings for an fp32 embedding and the head's packed fp32 copy of it.
    facts, dense = kept.engine.facts, fp32.engine.facts
    assert (facts.dtype, facts.memory.quantization, dense.memory.quantization) == ("float32", FORMAT, "none")
    assert "bf16 linear weights kept in bf16" in facts.dtype_reason
    held = sum(module_bytes(m) for m in quant.values())
    assert 2 * held == sum(module_bytes(m) for m in decoder_linears(fp32).values())
    fp32_model = fp32.engine.runner.model
    fp32_head = module_bytes(fp32_model.embed_tokens) + fp32_model.head_packed.nbytes
    assert module_bytes(model.embed_tokens) == 0 and 4 * module_bytes(model.lm_head) == fp32_head
    assert facts.memory.weights == dense.memory.weights - held - fp32_head * 3 // 4


def test_only_auto_on_a_cpu_that_computes_in_fp32_keeps_them(bf16_checkpoint: Path, default_model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    assert set(stored_dtypes(bf16_checkpoint).values()) == {"BF16"}
    assert set(stored_dtypes(default_model_dir).values()) == {"F32"}
    assert bf16_storage(None, AVX2_AUTO, CPU, bf16_checkpoint) == stored_dtypes(bf16_checkpoint)
    assert bf16_storage(None, resolve_dtype("float32"), CPU, bf16_checkpoint) is None  # fp32 weights, as asked
    assert bf16_storage(None, AVX2_AUTO, CPU, default_model_dir) is None  # an fp32 checkpoint
    assert bf16_storage("nf4", AVX2_AUTO, CPU, bf16_checkpoint) is None  # the quantization holds the weights
    assert bf16_storage(None, AVX2_AUTO, torch.device("cuda"), bf16_checkpoint) is None
    native = DtypeChoice(torch.bfloat16, "auto", "this CPU multiplies bf16 natively", True)
    assert bf16_storage(None, native, CPU, bf16_checkpoint) is None  # the whole model is bf16 there
    monkeypatch.setattr(cpu_quant, "library", lambda: None)
    with caplog.at_level(logging.WARNING, logger="loraplex.quant.bf16_weights"):
        assert bf16_storage(None, AVX2_AUTO, CPU, bf16_checkpoint) is None
    assert "widened to float32" in caplog.text and "not built" in caplog.text


def test_an_untied_head_and_the_embeddings_are_kept_apart(bf16_checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint with its own lm_head.weight: the head a bf16 QuantLinear, the embeddings a bf16 buffer of their
    own, both the checkpoint's bits; the logits those of the fp32 model loaded from it, to fp32 rounding."""
    from safetensors.torch import load_file, save_file

    untied = tmp_path / "untied"
    shutil.copytree(bf16_checkpoint, untied)
    state = load_file(str(untied / "model.safetensors"))
    head = state["model.embed_tokens.weight"].flip(0).contiguous()  # another matrix than the embeddings
    save_file({**state, "lm_head.weight": head}, str(untied / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    fp32, kept = load_model(untied, torch.float32, 64), load_model(untied, torch.float32, 64)
    before, after = keep_bf16_weights(kept, stored_dtypes(untied))
    assert isinstance(kept.lm_head, QuantLinear) and torch.equal(kept.lm_head.bf16_weight, head)
    assert isinstance(kept.embed_tokens, Bf16Embedding) and torch.equal(kept.embed_tokens.rows,
                                                                        state["model.embed_tokens.weight"])
    assert module_bytes(kept.embed_tokens) == module_bytes(kept.lm_head) == head.nbytes and 2 * after == before
    kept.prepack()
    x = torch.randn(5, head.shape[1])
    torch.testing.assert_close(kept.lm_head(x), fp32.lm_head(x), rtol=1e-5, atol=1e-4)
