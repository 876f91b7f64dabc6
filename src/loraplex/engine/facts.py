"""EngineFacts: what an engine serves, fixed at start and read once (the model, its context, batch and memory,
the dtype it resolved). No torch: the HTTP server, the dashboard and the cluster's CPU-only ingress (which gets a
replica's facts over Ray) read it without loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.units import human


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    quantization: str  # "none", "nf4", "nf4+double-quant", "fp4", "int8", "gguf", "bf16-weights"
    weights: int  # bytes of the base model as held
    kv_cache: int  # bytes of the KV cache (num_blocks * block bytes)
    kv_blocks: int
    block_size: int
    max_model_len: int
    adapter_slot: int  # bytes of one device slot
    adapter_slots: int

    @property
    def adapters(self) -> int:
        return self.adapter_slot * self.adapter_slots

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    @property
    def kv_sequences_at_max_len(self) -> int:
        """Sequences of max_model_len tokens the KV cache holds at once (shorter ones: proportionally more)."""
        return self.kv_blocks // -(-self.max_model_len // self.block_size)

    def describe(self) -> str:
        return (f"memory: base weights {human(self.weights)} ({self.quantization}); KV cache {human(self.kv_cache)} = "
                f"{self.kv_tokens} tokens, {self.kv_sequences_at_max_len} concurrent sequences at the full "
                f"{self.max_model_len}-token context; adapters {human(self.adapters)} = {self.adapter_slots} device "
                f"slots of {human(self.adapter_slot)}")


@dataclass(frozen=True, slots=True)
class BatchInvariance:
    """Whether a row's result depends only on that row, whatever else shares its step (EngineConfig.batch_invariant)."""
    enabled: bool
    detail: str  # how it is guaranteed, or why it is off


@dataclass(frozen=True, slots=True)
class EngineFacts:
    model_name: str  # the base model's own name (the served name may differ: --served-model-name)
    model_dir: Path
    max_model_len: int
    block_size: int  # tokens per KV block
    max_num_seqs: int  # requests running at once (a cluster: over every replica)
    dtype: str  # the resolved model dtype, e.g. "float32"
    dtype_reason: str  # "dtype auto -> float32: this CPU has no native bf16 (AVX2)"
    device: str  # what the dtype was resolved for: the CPU and its class, or the GPU
    memory: MemoryPlan
    max_prepare_seconds: float  # the cap on one request's templating, tokenization and grammar compilation
    eos_token_ids: tuple[int, ...] = ()  # the tokens that end a generation (beam search completes a beam on one)
    batch_invariance: BatchInvariance = BatchInvariance(False, "off")
