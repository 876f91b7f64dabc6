"""SamplingParams: how one request's tokens are chosen, validated on creation. No torch (the sampling itself is
engine/sampler.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.errors import InvalidRequestError

_INT32 = 2**31


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (all(0 <= t < _INT32 for t in self.stop_token_ids), "stop_token_ids must be non-negative token ids"),
            (self.max_tokens < _INT32, f"max_tokens must be < 2**31, got {self.max_tokens}"),
            (self.top_k < _INT32, f"top_k must be < 2**31, got {self.top_k}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy_params(cls, max_tokens: int = 16, **kw: object) -> SamplingParams:
        return cls(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]
