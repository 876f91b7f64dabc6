"""Serving a GGUF model's decoder linears on the blocks the file ships (`--quantization gguf`).

The model is loaded as always (the GGUF dequantized once into a cached Hugging Face directory: the norms come from
there); then each decoder linear is swapped for a QuantLinear holding its parts' GGUF blocks (Q4_0, Q4_1 or Q8_0:
the embedded default's linears are Q4_1), run by the fused CPU kernels (cpu_quant.GgufRows), and a tied LM head
and the embeddings read the file's token_embd blocks (the default's are Q8_0). llama.cpp stores q and k rows
permuted for its rotary layout; transformers undoes that when it dequantizes (its tensor processor for the
architecture), and the kernel reads the same rows through a row map made by that processor, so the weights are the
loaded ones bit for bit (tests/test_gguf_serving.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loraplex.errors import ModelLoadError
from loraplex.models.config import ModelConfig
from loraplex.models.layers import Linear, layer_index
from loraplex.quant.cpu_quant import GGUF_BLOCK_BYTES, GgufRows
from loraplex.quant.linear import QuantLinear

log = logging.getLogger(__name__)

# Checkpoint part names (models/config.py linear_parts) -> GGUF tensor names inside "blk.{layer}."
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


class GgufError(ModelLoadError):
    """The GGUF file cannot be served on its own blocks (a type the kernels do not read, a shape that differs)."""


def _row_maps(reader: Any, cfg: ModelConfig) -> Any:
    """transformers' tensor processor for the file's architecture: the one that reorders q and k rows at load."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

    arch = read_field(reader, "general.architecture")[0]
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={"num_attention_heads": cfg.num_heads,
                                                                "num_key_value_heads": cfg.num_kv_heads})


def gguf_rows(tensor: Any, processor: Any, n: int, k: int) -> GgufRows:
    """One GGUF tensor (gguf.ReaderTensor) as the kernel reads it, with the row map the processor (transformers'
    TensorProcessor) implies, None if none."""
    name, qtype = tensor.name, int(tensor.tensor_type)
    if qtype not in GGUF_BLOCK_BYTES:
        raise GgufError(f"{name} is {tensor.tensor_type.name}: --quantization gguf serves Q4_0, Q4_1 and Q8_0 "
                        f"blocks (serve this file without it to dequantize it)")
    data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))  # a copy: the file is mapped
    if data.dim() != 2 or data.shape[0] != n:
        raise GgufError(f"{name} holds {tuple(data.shape)} bytes; the model's config wants {n} rows of {k}")
    order = np.asarray(processor.process(np.arange(n)[:, None], name).weights)[:, 0]
    rows = None if np.array_equal(order, np.arange(n)) else torch.from_numpy(order.astype(np.int64))
    return GgufRows(data, qtype, n, k, rows)


def gguf_model(model: nn.Module, path: Path, cfg: ModelConfig) -> tuple[int, int]:
    """Swap every decoder-layer Linear of `model` for a QuantLinear on the blocks `path` ships, and a tied head and
    the embeddings for its token_embd blocks where the kernel reads them; returns (bytes before, bytes after) of the
    decoder-layer linears."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    processor = _row_maps(reader, cfg)
    before = after = 0
    for name, module in list(model.named_modules()):
        layer = layer_index(name)
        if not isinstance(module, Linear) or layer is None:
            continue
        parts = []
        for part, size in module.parts:
            key = f"blk.{layer}.{GGUF_NAMES[part]}.weight"
            if key not in tensors:
                raise GgufError(f"{path.name} has no tensor {key} for {name}.{part}")
            parts.append(gguf_rows(tensors[key], processor, size, module.in_features))
        q = QuantLinear.of_gguf(module, parts)
        before += module.weight.nbytes
        after += q.nbytes()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    embd = tensors.get("token_embd.weight")
    if cfg.tie_word_embeddings and embd is not None and int(embd.tensor_type) in GGUF_BLOCK_BYTES:
        dense = model.embed_tokens.weight.nbytes  # type: ignore[union-attr]
        held = tie_gguf_head(model, embd, processor, cfg)
        log.info("tied LM head and embeddings on the file's %s blocks: %.1f MiB (dense: %.1f MiB, and as much again "
                 "for the head's packed copy)", embd.tensor_type.name, held / 2**20, dense / 2**20)
    return before, after


class GgufEmbedding(nn.Module):
    """Token embeddings looked up in GGUF blocks: each id's row decoded by the kernel (rows = the ids), in the model
    dtype. The blocks are the tied LM head's (a QuantLinear); counted there, not here."""

    def __init__(self, rows: GgufRows, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = rows
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = rows.n, rows.k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, hidden]
        from loraplex.quant import cpu_quant

        flat = ids.reshape(-1).to(torch.int64).contiguous()
        picked = cpu_quant.GgufRows(self.blocks.data, self.blocks.type, flat.numel(), self.blocks.k, flat)
        return cpu_quant.dequantize(picked, self.dtype).view(*ids.shape, self.embedding_dim)


def tie_gguf_head(model: nn.Module, tensor: Any, processor: Any, cfg: ModelConfig) -> int:
    """The tied LM head and the embeddings on the file's token_embd blocks (the default's are Q8_0), instead of a
    dense embedding and its packed copy; returns the blocks' bytes. The head runs through the kernel at every batch:
    dequantizing its 49152 rows a call costs more than the dense GEMM saves (batch 32, 8 adapters, one run each:
    0.76x the dense base through the kernel against 0.50x dequantized on the AVX2 class; 0.40x against 0.44x on
    AMX-BF16)."""
    dtype = model.norm.weight.dtype  # type: ignore[union-attr]
    rows = gguf_rows(tensor, processor, cfg.vocab_size, cfg.hidden_size)
    shape = Linear(cfg.hidden_size, [("lm_head", cfg.vocab_size)])
    shape.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)  # QuantLinear reads its dtype only
    head = QuantLinear.of_gguf(shape, [rows])
    head.kernel_max_rows = 1 << 62
    model.lm_head = head  # type: ignore[assignment]
    model.embed_tokens = GgufEmbedding(rows, dtype)  # type: ignore[assignment]
    return head.nbytes()


def serve_gguf_blocks(model: nn.Module, spec: str | None, cfg: ModelConfig, dtype: torch.dtype,
                      device: torch.device) -> tuple[int, int]:
    """`--quantization gguf`: the checks that make it servable (a GGUF model, the CPU, the kernels built, a dtype
    they take), then gguf_model. Raises GgufError naming what is missing."""
    from loraplex.models.loader import gguf_file
    from loraplex.quant import cpu_quant

    path = gguf_file(spec)
    if path is None:
        raise GgufError(f"--quantization gguf serves a GGUF model on its own blocks; model {spec!r} is not a .gguf "
                        f"file")
    if device.type != "cpu":
        raise GgufError(f"--quantization gguf runs on the CPU (its kernels are CPU kernels), not on {device}")
    if dtype not in cpu_quant.DTYPES:
        raise GgufError(f"--quantization gguf computes in float32 or bfloat16, not {dtype}")
    if cpu_quant.library() is None:
        raise GgufError("--quantization gguf needs the fused quantized CPU kernels, which are not built here (no C++ "
                        "compiler, or LORAPLEX_QUANT_KERNEL=torch); serve without it to dequantize the file instead")
    return gguf_model(model, path, cfg)
