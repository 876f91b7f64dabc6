"""The engine's model, built in one pipeline: resolve the dtype -> load the weights -> quantize (or keep a bf16
checkpoint's linears in bf16 where the model computes in fp32: quant/bf16_weights.py) -> move to
the device -> prepack (CPU only: a packed weight cannot move) -> plan the memory -> attach the LoRA wrappers.
Each step is its package's own function; this is the one place that says in which order they run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loraplex.allocator import bound_kernel_caches
from loraplex.config import EngineConfig
from loraplex.engine.facts import BatchInvariance, MemoryPlan
from loraplex.engine.memory import plan
from loraplex.hardware import DtypeChoice, cpu, resolve_device, resolve_dtype, warn_if_emulated
from loraplex.lora import cpu_kernel
from loraplex.lora.layers import LoRALinear, attach_lora
from loraplex.models import cpu_attention
from loraplex.models.config import ModelConfig, load_model_config
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.row_tiles import WHOLE
from loraplex.models.loader import load_model, resolve_model
from loraplex.quant import bf16_weights

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BuiltModel:
    model: LlamaForCausalLM
    config: ModelConfig
    model_dir: Path
    dtype: DtypeChoice
    device: torch.device
    device_description: str  # "AMD EPYC (AVX2)" or "cuda:0": what the dtype was resolved for
    max_model_len: int
    memory: MemoryPlan
    lora_targets: dict[tuple[int, str], LoRALinear]  # (layer, part) -> the wrapper holding that part's slots
    batch_invariance: BatchInvariance

    @property
    def lora_shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(layer, part) -> (in_features, out_features of that part): what an adapter must match."""
        return {key: (w.in_features, dict(w.parts)[key[1]]) for key, w in self.lora_targets.items()}


def build_model(config: EngineConfig) -> BuiltModel:
    """Everything the engine runs, before the KV cache exists; raises naming the figures if a budget does not fit."""
    t0 = time.perf_counter()
    bound_kernel_caches()  # before the first oneDNN kernel: a server sees ever new row counts (allocator.py)
    device = torch.device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    where = cpu().describe() if device.type == "cpu" else str(device)
    log.info("%s on %s", dtype.describe(), where)
    warn_if_emulated(dtype)
    model_dir = resolve_model(config.model)
    mcfg = load_model_config(model_dir)
    max_model_len = config.max_model_len or min(mcfg.max_position_embeddings, 4096)
    model = load_model(model_dir, dtype.dtype, max_model_len, mcfg)
    weights_format = None
    if (stored := bf16_weights.bf16_storage(config.quantization, dtype, device, model_dir)) is not None:
        before, after = bf16_weights.keep_bf16_weights(model, stored)
        dtype, weights_format = replace(dtype, reason=bf16_weights.reason(dtype)), bf16_weights.FORMAT
        log.info("%s: %.1f MiB -> %.1f MiB", dtype.describe(), before / 2**20, after / 2**20)
    elif config.quantization == "gguf":  # decoder-layer linears -> the file's own blocks
        from loraplex.quant.gguf import serve_gguf_blocks

        before, after = serve_gguf_blocks(model, config.model, mcfg, dtype.dtype, device)
    elif config.quantization is not None:  # decoder-layer linears -> bitsandbytes codes; LoRA goes on top in `dtype`
        from loraplex.quant.linear import quantize_model

        before, after = quantize_model(model, config.quantization, config.double_quant)
    if config.quantization is not None:
        log.info("quantized the decoder linears to %s%s: %.1f MiB -> %.1f MiB (%.2fx smaller)", config.quantization,
                 " with double quantization" if config.double_quant else "", before / 2**20, after / 2**20,
                 before / after)
    model.to(device)
    # On CPU: oneDNN's layout for every remaining linear (and its invariant row tiles); on a GPU nothing.
    model.prepack(config.batch_invariant)
    invariance = batch_invariance(model, config, device)
    if config.batch_invariant:
        (log.info if invariance.enabled else log.warning)("batch invariance: %s", invariance.detail)
    memory = plan(model, mcfg, config, dtype.dtype, device, max_model_len, weights_format)
    log.info("%s", memory.describe())
    targets = attach_lora(model, config.max_loras, config.max_lora_rank, dtype.dtype) if config.enable_lora else {}
    log.info("built %s (%s, %s) in %.1fs", mcfg.name, mcfg.architecture, dtype.name, time.perf_counter() - t0)
    return BuiltModel(model, mcfg, model_dir, dtype, device, where, max_model_len, memory, targets, invariance)


def batch_invariance(model: LlamaForCausalLM, config: EngineConfig, device: torch.device) -> BatchInvariance:
    """Whether a row's result follows from that row alone: every base linear (the LM head included; packed, plain or
    quantized) in its probed row tiles, attention per query and LoRA per token (the C++ kernels, or their torch
    twins). On a CPU it always holds; a GPU is reported off."""
    if not config.batch_invariant:
        return BatchInvariance(False, "off (--batch-invariant turns it on)")
    if device.type != "cpu":
        return BatchInvariance(False, "requested but not available on a GPU (its GEMM libraries pick their "
                                      "summation order by the number of rows)")
    dtype, cfg = model.norm.weight.dtype, model.cfg
    found = model.linear_tilings()
    tilings = [t for t in found if t is not None]
    assert len(tilings) == len(found), "prepack(batch_invariant=True) tiles every base linear on a CPU"
    sizes = [t.rows for t in tilings if t is not WHOLE]
    fixed = sum(t is WHOLE for t in tilings)  # the fused quantized kernels' layers: fixed order, never cut
    padded = sum(t.pad_single for t in tilings)
    attention = "the C++ kernel" if cpu_attention.serves(dtype, device, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) \
        else "torch, per key block (no C++ attention kernel: slower)"
    lora = "the C++ kernel" if cpu_kernel.supported(dtype, device) else "torch, token by token (no C++ LoRA " \
                                                                       "kernel: slower)"
    rows = "" if not sizes else f"{min(sizes)} rows" if min(sizes) > 1 else "1 row"
    kernel = f"through the fused quantized kernel, which sums each row in a fixed order ({fixed} of {len(tilings)})"
    tiles = f"in calls of at most {rows} (found on this CPU at start; a lone row padded to two in {padded} of " \
        f"{len(tilings)})"
    linears = f"{tiles}, or {kernel}" if sizes and fixed else tiles if sizes else kernel
    return BatchInvariance(True, f"on: every base linear runs {linears}; every query, prefill or decode, attends its "
                                 f"own keys in position order through {attention}; every token's LoRA sums over its "
                                 f"own adapter through {lora}")
