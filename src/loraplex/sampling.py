"""SamplingParams: how one request's tokens are chosen, validated on creation. No torch (the sampling itself is
engine/sampler.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.errors import InvalidRequestError

_INT32 = 2**31


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the output (engine/structured.py): `value` is the JSON schema or the list of choices as JSON
    text, the regex, or the Lark/GBNF grammar; unused for json_object."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")


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
    # Logits processing (engine/logits_processors.py), in this order: bias and token masks, then penalties.
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often the token was generated
    repetition_penalty: float = 1.0  # vLLM/transformers: seen tokens (prompt + output) divided (>0) or multiplied
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    min_p: float = 0.0  # drop tokens below min_p times the most likely token's probability
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] = field(default_factory=list)  # never generated (their last token is banned after the rest)
    logprobs: int | None = None  # log-probabilities of each sampled token and of this many most likely ones
    prompt_logprobs: int | None = None  # log-probabilities of the prompt's tokens (and this many top ones)
    structured: StructuredOutput | None = None  # the output must match this (JSON schema, regex, choice, grammar)

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
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 < self.repetition_penalty <= 10, f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (all(0 <= t < _INT32 for t in self.logit_bias), "logit_bias keys must be non-negative token ids"),
            (self.allowed_token_ids is None or (len(self.allowed_token_ids) > 0
                                                and all(0 <= t < _INT32 for t in self.allowed_token_ids)),
             "allowed_token_ids must be a non-empty list of non-negative token ids"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def needs_logits_processing(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids is not None or self.bad_words)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy_params(cls, max_tokens: int = 16, **kw: object) -> SamplingParams:
        return cls(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


@dataclass(slots=True)
class TokenLogprobs:
    """A sampled token's log-probability and the most likely tokens', from the distribution it was drawn from
    after logit bias, penalties and temperature, before min_p, top-k and top-p truncation (vLLM's
    `processed_logprobs`); greedy requests at temperature 1."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first
