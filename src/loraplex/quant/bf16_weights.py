"""A bf16 checkpoint's linears kept in bf16 where the model computes in float32 (issue 32, item 3).

On a CPU without native bf16, `--dtype auto` resolves to float32 (hardware.py): bf16 arithmetic is emulated there and
far slower. Widening a bf16 checkpoint's weights to fp32 gives the very same values at twice the bytes, and a decode
step reads every weight once, so it reads twice what it needs. Kept as stored, the fused kernel widens each weight as
it reads it (cpu_quant.Bf16Rows; a shift, exact): activations, LoRA, norms and attention stay fp32, and the result is
an fp32 model's up to the order of the sums.

What is kept: every decoder linear stored in bf16, and the LM head with the embeddings where they are stored in bf16
(a tied head and the embeddings then share one bf16 tensor, instead of an fp32 embedding and the head's packed copy
of it). It applies with `--dtype auto` only: `--dtype float32` asks for fp32 weights and gets them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.hardware import DtypeChoice
from loraplex.models.layers import Linear
from loraplex.models.loader import stored_dtypes
from loraplex.quant import cpu_quant
from loraplex.quant.linear import BF16_WEIGHTS, QuantLinear, quantize_model

log = logging.getLogger(__name__)

FORMAT = "bf16-weights"  # the memory plan's name for it (/v1/models, /metrics, the dashboard)


def _decoder_linear(name: str) -> bool:
    return ".layers." in name and name.endswith("_proj.weight")


def bf16_storage(quantization: str | None, dtype: DtypeChoice, device: torch.device,
                 model_dir: Path) -> dict[str, str] | None:
    """The checkpoint's stored dtypes (loader.stored_dtypes) where its bf16 weights are to be kept in bf16, else None:
    an fp32 model chosen by `auto` on a CPU, an unquantized base whose checkpoint stores its decoder linears in bf16,
    and the kernel that reads them built. Returned so that keep_bf16_weights does not read the headers again."""
    if not (device.type == "cpu" and quantization is None and dtype.requested == "auto"
            and dtype.dtype == torch.float32):
        return None
    stored = stored_dtypes(model_dir)
    if {d for n, d in stored.items() if _decoder_linear(n)} != {"BF16"}:
        return None
    if cpu_quant.library() is None:
        log.warning("the checkpoint's bf16 linear weights are widened to float32 (twice the bytes a decode step "
                    "reads): the fused kernel that reads them as stored is not built (loraplex info says why)")
        return None
    return stored


class Bf16Embedding(nn.Module):
    """Token embeddings held in bf16, widened (exactly) to the model dtype as they are looked up. Tied, the rows are
    the LM head's tensor (counted by the head, so not a buffer here)."""

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype, tied: bool) -> None:
        super().__init__()
        if tied:
            self.rows = rows
        else:
            self.register_buffer("rows", rows, persistent=False)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = rows.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, hidden] in the model dtype
        return F.embedding(ids, self.rows).to(self.dtype)


def keep_bf16_weights(model: nn.Module, stored: dict[str, str]) -> tuple[int, int]:
    """Keep `model`'s (loaded in fp32 from a bf16 checkpoint: the values are exact) weights in bf16 where the
    checkpoint stores them so (`stored`: its tensors' stored dtypes, from bf16_storage): the decoder linears, and the
    LM head with the embeddings. Returns (bytes before, bytes after) of what was kept."""
    before, after = quantize_model(model, BF16_WEIGHTS)  # bf16 -> fp32 at load and back: the stored bits
    embed = next((d for n, d in stored.items() if n.endswith("embed_tokens.weight")), None)
    head = stored.get("lm_head.weight", embed)  # a tied head is the embeddings' tensor
    if embed != "BF16" or head != "BF16":
        return before, after
    dtype = model.norm.weight.dtype  # type: ignore[union-attr]
    dense = model.embed_tokens.weight  # type: ignore[union-attr]
    if model.lm_head is None:  # tied: one bf16 tensor for the head and the lookups
        shape = Linear(dense.shape[1], [("lm_head", dense.shape[0])])
        shape.weight = dense  # the values QuantLinear keeps in bf16
        before += dense.nbytes
        model.lm_head = QuantLinear(shape, BF16_WEIGHTS)  # type: ignore[assignment]
        model.embed_tokens = Bf16Embedding(model.lm_head.bf16_weight, dtype, tied=True)  # type: ignore[union-attr]
        after += model.lm_head.nbytes()  # type: ignore[union-attr]
    else:
        before += dense.nbytes + model.lm_head.weight.nbytes  # type: ignore[union-attr]
        model.lm_head = QuantLinear(model.lm_head, BF16_WEIGHTS)  # type: ignore[arg-type, assignment]
        model.embed_tokens = Bf16Embedding(dense.to(torch.bfloat16), dtype, tied=False)  # type: ignore[assignment]
        after += model.lm_head.nbytes() + model.embed_tokens.rows.nbytes  # type: ignore[union-attr, operator]
    return before, after


def reason(dtype: DtypeChoice) -> str:
    """The dtype's reason, with what this adds, for the log and /v1/models."""
    return f"{dtype.reason}; the checkpoint's bf16 linear weights kept in bf16 and widened exactly as read"
