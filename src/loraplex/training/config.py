"""TrainConfig: what `loraplex train` does, as data (no torch: the CLI builds it while parsing flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import InvalidRequestError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data: Path
    output: Path
    base: str | None = None  # None = the embedded default model
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = TARGETS
    layers: tuple[int, ...] | None = None  # PEFT's layers_to_transform: LoRA on these decoder layers only
    qlora: bool = False
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    eval_data: Path | None = None
    overwrite: bool = False
    max_steps: int | None = None  # stop early (tests, smoke runs)
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise InvalidRequestError(f"unknown target module(s) {', '.join(bad)}; valid: {', '.join(TARGETS)}")
        checks = [(self.rank >= 1, "--rank must be >= 1"), (self.epochs >= 1, "--epochs must be >= 1"),
                  (self.batch_size >= 1, "--batch-size must be >= 1"), (self.max_length >= 2, "--max-length must be >= 2"),
                  (0 <= self.dropout < 1, "--dropout must be in [0, 1)"), (self.lr > 0, "--lr must be > 0"),
                  (self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
                   "--layers must list decoder layer indices >= 0")]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
