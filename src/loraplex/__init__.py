"""loraplex: one resident base model, many LoRA adapters, decoded together in the same forward pass."""

from loraplex.config import EngineConfig
from loraplex.engine.outputs import CompletionOutput, RequestOutput
from loraplex.llm import LLM
from loraplex.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
