"""LoRARequest: vLLM's offline name for "this prompt runs on the adapter at this path" (vllm.lora.request), so that
`from loraplex.lora.request import LoRARequest` works where vLLM's import did. The LLM registers the adapter on
first sight (llm.py); the id keeps one adapter per id, as vLLM's cache keys on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str  # the adapter's name (a 1-128 character path component, as every adapter name here)
    lora_int_id: int  # vLLM's unique id of the adapter, > 0; one id never names two adapters
    lora_path: str = ""  # the PEFT adapter directory
    base_model_name: str | None = None  # vLLM's lineage field: the model the adapter was trained on (informative)

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest lora_int_id must be an integer > 0, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r} needs lora_path, the adapter's directory")

    # vLLM's aliases of the three fields.
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path
