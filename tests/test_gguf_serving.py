"""Serving a GGUF model on the blocks it ships (`--quantization gguf`, issue 32 item 3): the embedded default's
decoder linears stay Q4_1 and its tied head and embeddings Q8_0, run through the fused GGUF kernel. Every linear
reads exactly the weights the model loads when it dequantizes the file (q and k rows through transformers' own
reordering), so answers and log-probabilities match the dequantized model's, with adapters on top; what is resident
is the file's blocks; and what cannot be served that way is refused at start, naming why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ALL, assert_same_greedy_answers
from loraplex import LLM, EngineConfig
from loraplex.engine.memory import module_bytes
from loraplex.errors import InvalidRequestError
from loraplex.models.config import load_model_config
from loraplex.models.layers import Linear, layer_index
from loraplex.models.loader import gguf_file, load_model, resolve_model
from loraplex.quant import cpu_quant
from loraplex.quant.gguf import GgufError, gguf_model, gguf_rows
from loraplex.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(cpu_quant.library() is None, reason="no C++ compiler to build the kernel")
gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_decoder_linear_reads_the_weights_the_model_loads(dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the 120 decoder linears, decoded from its Q4_1 blocks (the kernel's decoder; gguf-py's on a few, the
    reference), equals the weight loaded from the dequantized file, bit for bit; it holds the file's bytes."""
    model_dir = resolve_model(None)
    cfg = load_model_config(model_dir)
    dense = load_model(model_dir, dtype, 256, cfg)
    blocks = load_model(model_dir, dtype, 256, cfg)
    before, after = gguf_model(blocks, gguf_file(None), cfg)
    plain = {n: m for n, m in dense.named_modules() if isinstance(m, Linear) and layer_index(n) is not None}
    quant = {n: m for n, m in blocks.named_modules() if isinstance(m, QuantLinear) and layer_index(n) is not None}
    assert plain.keys() == quant.keys() and len(quant) == 4 * cfg.num_layers
    for name, q in quant.items():
        assert q.method == "gguf" and torch.equal(q.dequantize(), plain[name].weight), name
    # the tied head and the embeddings: the file's Q8_0 token_embd, the loaded embedding's values
    assert isinstance(blocks.lm_head, QuantLinear) and blocks.lm_head.gguf_parts[0].type == 8
    assert torch.equal(blocks.lm_head.dequantize(), dense.embed_tokens.weight)
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(blocks.embed_tokens(ids), dense.embed_tokens(ids))
    reader = gguf.GGUFReader(str(gguf_file(None)))
    shipped = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and t.tensor_type.name == "Q4_1")
    row_maps = cfg.num_layers * (cfg.q_size + cfg.kv_size) * 8  # int64 a q or k row
    assert after == shipped + row_maps and before == sum(m.weight.nbytes for m in plain.values())
    monkeypatch.setattr(cpu_quant, "library", lambda: None)
    for name in list(quant)[:4]:  # qkv, o, gate_up, down of layer 0 through gguf-py
        assert torch.equal(quant[name].dequantize(), plain[name].weight), name


def test_it_answers_as_the_dequantized_model_does(adapter_factory: Callable[..., Path]) -> None:
    """Greedy answers, base and with an adapter on every linear, equal the dequantized model's token for token, and
    their log-probabilities agree to fp32 rounding of a different summation order; the memory plan names the
    format and counts the blocks."""
    adapter = adapter_factory("gguf-all", r=8, alpha=16, targets=ALL, seed=11)
    kw: dict[str, object] = {"dtype": "float32", "max_model_len": 256, "lora_modules": {"t": str(adapter)}}
    dense, blocks = LLM(**kw), LLM(quantization="gguf", **kw)  # type: ignore[arg-type]
    assert_same_greedy_answers(dense, blocks, "t")
    mem, dense_mem = blocks.engine.facts.memory, dense.engine.facts.memory

    def linears(llm: LLM) -> int:
        return sum(module_bytes(m) for n, m in llm.engine.runner.model.named_modules()
                   if isinstance(m, (Linear, QuantLinear)) and layer_index(n) is not None)

    model, dense_model = blocks.engine.runner.model, dense.engine.runner.model
    head = module_bytes(model.lm_head)  # the Q8_0 blocks, for the head and the embeddings both
    dense_head = module_bytes(dense_model.embed_tokens) + dense_model.head_packed.nbytes  # its packed copy too
    assert mem.quantization == "gguf" and mem.weights == dense_mem.weights - (linears(dense) - linears(blocks)) - (
        dense_head - head)
    assert linears(blocks) * 6 < linears(dense)  # 405 MiB of fp32 weights -> 63 MiB of Q4_1 blocks (5 bits a weight)
    assert head * 7 < dense_head  # 2 x 108 MiB of fp32 -> 30 MiB of Q8_0 blocks


def test_what_cannot_be_served_on_its_blocks_is_refused_at_start(default_model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GgufError, match="is not a .gguf file"):
        LLM(model=str(default_model_dir), quantization="gguf", max_model_len=64)
    with pytest.raises(GgufError, match="float32 or bfloat16, not torch.float16"):
        LLM(quantization="gguf", dtype="float16", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="double_quant applies to 4-bit"):
        EngineConfig(quantization="gguf", double_quant=True)
    tensor = SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=gguf.GGMLQuantizationType.Q5_K,
                             data=np.zeros((4, 176), dtype=np.uint8))
    with pytest.raises(GgufError, match="blk.0.attn_q.weight is Q5_K: --quantization gguf serves Q4_0, Q4_1 and Q8_0"):
        gguf_rows(tensor, None, 4, 256)
    monkeypatch.setattr(cpu_quant, "library", lambda: None)
    with pytest.raises(GgufError, match="needs the fused quantized CPU kernels"):
        LLM(quantization="gguf", max_model_len=64)
