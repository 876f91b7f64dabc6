"""loraplex: one resident base model, many LoRA adapters, decoded together in the same forward pass.

The names below are imported on first use, so `import loraplex` (and `loraplex --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplex.config import EngineConfig
    from loraplex.engine.outputs import CompletionOutput, RequestOutput
    from loraplex.llm import LLM
    from loraplex.lora.request import LoRARequest
    from loraplex.sampling import SamplingParams

_EXPORTS = {"LLM": "loraplex.llm", "EngineConfig": "loraplex.config", "SamplingParams": "loraplex.sampling",
            "RequestOutput": "loraplex.engine.outputs", "CompletionOutput": "loraplex.engine.outputs",
            "LoRARequest": "loraplex.lora.request"}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
