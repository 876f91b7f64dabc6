"""Where the fused multi-LoRA kernel runs: the C++ kernel on CPU (cpu_kernel), Triton on CUDA (triton_ops).

One test, used both by the model runner's mapping (which kernel a step runs) and by the LoRA layers
(which layout their slots hold B in), so the two always agree.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from loraplex.lora import cpu_kernel

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Triton is installed (it is imported, by lora/triton_ops.py, only when a CUDA step runs)."""
    return importlib.util.find_spec("triton") is not None


def supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    """The fused kernel runs in `dtype` on `device` (else the torch grouped kernel serves)."""
    if torch.device(device).type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
            return False  # Triton's bf16 dot needs sm80+; older GPUs take the torch kernels
        return dtype in GPU_DTYPES and triton_available()
    return cpu_kernel.supported(dtype, device)
