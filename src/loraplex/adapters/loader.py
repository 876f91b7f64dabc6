"""AdapterLoader: reads and validates one adapter from disk for one engine's model (its LoRA targets' shapes, the
rank cap, whether pickled weights are allowed), and says when the adapter names another base. The manager holds
one and calls it on its loader thread (or a registering thread); it reads nothing of the engine's state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.peft_format import AdapterWeights, load_peft_adapter
from loraplex.errors import InvalidRequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterLoader:
    targets: dict[tuple[int, str], tuple[int, int]]  # (layer, module) -> (in, out): the model's LoRA targets
    max_rank: int
    allow_pickle: bool
    model_name: str
    model_dir: Path
    enabled: bool = True  # enable_lora=False: every load is refused

    def __call__(self, name: str, path: Path) -> AdapterWeights:
        if not self.enabled:
            raise InvalidRequestError("LoRA is disabled (enable_lora=False)")
        weights = load_peft_adapter(name, path, self.targets, self.max_rank, self.allow_pickle)
        if weights.base_model_name and not self.is_our_base(weights.base_model_name):
            log.warning("adapter %r was trained for %r, serving it on %r", name, weights.base_model_name,
                        self.model_name)
        return weights

    def is_our_base(self, base: str) -> bool:
        """Whether an adapter's base_model_name_or_path names this model (a path to it, its name, or a hub id
        ending in it)."""
        tail = base.rstrip("/").rsplit("/", 1)[-1]
        return tail in {self.model_name, self.model_dir.name} or Path(base).resolve() == self.model_dir.resolve()
