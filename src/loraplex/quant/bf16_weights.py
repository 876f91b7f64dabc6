"""A bf16 checkpoint's decoder linears kept in bf16 where the model computes in float32 (issue 32, item 3).

On a CPU without native bf16, `--dtype auto` resolves to float32 (hardware.py): bf16 arithmetic is emulated there and
far slower. Widening a bf16 checkpoint's weights to fp32 gives the very same values at twice the bytes, and a decode
step reads every weight once, so it reads twice what it needs. Kept as stored, the fused kernel widens each weight as
it reads it (cpu_quant.Bf16Rows; a shift, exact): activations, LoRA, norms and attention stay fp32, and the result is
an fp32 model's up to the order of the sums.

It applies with `--dtype auto` only: `--dtype float32` asks for fp32 weights and gets them. Embeddings and the LM head
stay in the model dtype, as a quantized base leaves them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loraplex.hardware import DtypeChoice
from loraplex.models.loader import decoder_linear_dtypes
from loraplex.quant import cpu_quant

log = logging.getLogger(__name__)

FORMAT = "bf16-weights"  # the memory plan's name for it (/v1/models, /metrics, the dashboard)


def keeps_bf16(quantization: str | None, dtype: DtypeChoice, device: torch.device, model_dir: Path) -> bool:
    """Whether to keep the checkpoint's decoder linears in bf16: an fp32 model chosen by `auto` on a CPU, an
    unquantized base whose checkpoint stores them in bf16, and the kernel that reads them built."""
    if not (device.type == "cpu" and quantization is None and dtype.requested == "auto"
            and dtype.dtype == torch.float32 and decoder_linear_dtypes(model_dir) == {"BF16"}):
        return False
    if cpu_quant.library() is None:
        log.warning("the checkpoint's bf16 linear weights are widened to float32 (twice the bytes a decode step "
                    "reads): the fused kernel that reads them as stored is not built (loraplex info says why)")
        return False
    return True


def reason(dtype: DtypeChoice) -> str:
    """The dtype's reason, with what this adds, for the log and /v1/models."""
    return f"{dtype.reason}; the checkpoint's bf16 decoder linear weights kept in bf16 and widened exactly as read"
