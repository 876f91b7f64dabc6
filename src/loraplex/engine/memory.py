"""Where the memory goes: base weights (as held: quantized codes and scales, packed copies), the KV
cache budget and the adapter slots, with the capacity each gives. Checked before anything is allocated.

Sizes are measured from the tensors (weights) or computed from shapes (KV blocks, adapter slots), so
the figures logged at start, published on /metrics and reported by benchmarks are the same numbers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from loraplex.config import EngineConfig
from loraplex.engine.facts import MemoryPlan
from loraplex.errors import InvalidRequestError
from loraplex.models.config import ModelConfig
from loraplex.models.layers import Linear, layer_index
from loraplex.units import human

log = logging.getLogger(__name__)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # also right for oneDNN-packed tensors, which have no plain storage


def module_bytes(m: nn.Module) -> int:
    """Bytes one module holds itself, not its children: parameters, buffers, oneDNN-packed copies, or a
    quantized linear's codes and scales."""
    from loraplex.quant.linear import QuantLinear

    if isinstance(m, QuantLinear):
        return m.nbytes() + (0 if m.bias is None else _tensor_bytes(m.bias))
    total = sum(_tensor_bytes(t) for t in m.parameters(recurse=False))
    total += sum(_tensor_bytes(t) for t in m.buffers(recurse=False))
    for attr in ("packed", "head_packed"):
        t = getattr(m, attr, None)
        if isinstance(t, torch.Tensor):
            total += _tensor_bytes(t)
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy as held (every module's `module_bytes`). LoRA slots are not weights
    (see `slot_bytes`): the LoRA wrappers hold them as plain tensors, not parameters or buffers."""
    return sum(module_bytes(m) for m in model.modules())


def slot_bytes(model: nn.Module, max_rank: int, dtype: torch.dtype) -> int:
    """Bytes of one adapter slot: A and B of every decoder-layer linear, as the LoRA layers will hold them
    (lora.layers.slot_layout: B compact for the fused kernel, block-diagonal for the torch one)."""
    from loraplex.lora.layers import slot_layout
    from loraplex.quant.linear import QuantLinear

    size = torch.finfo(dtype).bits // 8
    device = next(iter([*model.parameters(), *model.buffers()])).device
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, (Linear, QuantLinear)) and layer_index(name) is not None:
            total += slot_layout(m.parts, m.in_features, max_rank, dtype, device).slot_elements * size
    return total


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device` (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan(model: nn.Module, cfg: ModelConfig, config: EngineConfig, dtype: torch.dtype, device: torch.device,
         max_model_len: int, weights_format: str | None = None) -> MemoryPlan:
    """The memory plan for a loaded (quantized, prepacked) model, before the KV cache and slots exist: raises
    naming the figures if a budget does not fit. `weights_format` names how the base weights are held where no
    --quantization says it (bf16_weights.FORMAT)."""
    kv_block = cfg.num_layers * 2 * config.block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    one_slot = slot_bytes(model, config.max_lora_rank, dtype) if config.enable_lora else 0
    slots = config.max_loras if config.enable_lora else 0
    kv_budget = config.kv_cache_memory
    if config.gpu_memory_utilization is not None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            kv_budget = utilization_budget(config.gpu_memory_utilization, total, total - free, slots * one_slot)
        else:
            log.info("--gpu-memory-utilization applies to a GPU; on the %s --kv-cache-memory (%s) sizes the KV cache",
                     device.type, human(kv_budget))
    blocks = check_budgets(kv_budget=kv_budget, kv_block_bytes=kv_block, block_size=config.block_size,
                           max_model_len=max_model_len, max_loras=slots, one_slot=one_slot,
                           adapter_budget=config.adapter_memory, free=available_memory(device))
    quant = (config.quantization or weights_format or "none") + ("+double-quant" if config.double_quant else "")
    return MemoryPlan(quantization=quant, weights=weight_bytes(model), kv_cache=blocks * kv_block, kv_blocks=blocks,
                      block_size=config.block_size, max_model_len=max_model_len, adapter_slot=one_slot,
                      adapter_slots=slots)


def utilization_budget(utilization: float, total: int, used: int, slots: int) -> int:
    """The KV cache's bytes when this engine may fill `utilization` of a GPU's `total` memory: what is left of that
    share after what is `used` already (the weights, other processes) and the adapter slots (vLLM's
    --gpu-memory-utilization; the remaining share is the activations' headroom)."""
    budget = int(utilization * total) - used - slots
    if budget <= 0:
        raise InvalidRequestError(
            f"--gpu-memory-utilization {utilization} allows {human(int(utilization * total))} of {human(total)}, but "
            f"{human(used)} is in use already and the adapter slots need {human(slots)}: nothing is left for the KV "
            f"cache; raise it, lower --max-loras, or quantize the base (--quantize nf4)")
    return budget


def check_budgets(*, kv_budget: int, kv_block_bytes: int, block_size: int, max_model_len: int, max_loras: int,
                  one_slot: int, adapter_budget: int | None, free: int | None) -> int:
    """Validate the KV and adapter budgets against each other and the free memory; returns the KV block count."""
    num_blocks = kv_budget // kv_block_bytes
    need = -(-max_model_len // block_size)
    if num_blocks < need:
        raise InvalidRequestError(
            f"--kv-cache-memory {human(kv_budget)} holds {num_blocks} blocks of {block_size} tokens, fewer than the "
            f"{need} one sequence of --max-model-len {max_model_len} needs; raise --kv-cache-memory to at least "
            f"{human(need * kv_block_bytes)} or lower --max-model-len")
    slots = max_loras * one_slot
    if adapter_budget is not None and slots > adapter_budget:
        raise InvalidRequestError(
            f"--max-loras {max_loras} adapter slots need {human(slots)} ({human(one_slot)} each at the "
            f"--max-lora-rank); --adapter-memory {human(adapter_budget)} fits {adapter_budget // one_slot}: lower "
            f"--max-loras or --max-lora-rank, or raise --adapter-memory")
    want = num_blocks * kv_block_bytes + slots
    if free is not None and want > free:
        raise InvalidRequestError(
            f"the KV cache ({human(num_blocks * kv_block_bytes)}) and adapter slots ({human(slots)}) need "
            f"{human(want)}, but only {human(free)} is free after loading the weights: lower --kv-cache-memory "
            f"or --max-loras, or quantize the base (--quantize nf4)")
    return num_blocks
