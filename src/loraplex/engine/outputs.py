"""What the engine returns: vLLM-shaped RequestOutput / CompletionOutput, with streaming deltas; and
EngineSnapshot, its state between two steps (for /metrics); EngineStats, the dashboard's fuller view."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.adapters.key import AdapterKey
from loraplex.adapters.metrics import AdapterStats
from loraplex.adapters.tiers import TierView
from loraplex.engine.step_log import BatchHistory
from loraplex.sampling import TokenLogprobs


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # all text so far
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids, when the request asked
    delta_logprobs: list[TokenLogprobs] | None = None  # those of delta_token_ids


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    adapter: AdapterKey | None  # the adapter version it ran on (str() gives "name@version"), None = base model
    outputs: list[CompletionOutput]
    finished: bool
    error: Exception | None = None  # set when the request failed (e.g. its adapter failed to load)
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (the first: None), when asked


@dataclass(slots=True)
class PrefixCacheSnapshot:
    enabled: bool
    cached_blocks: int  # full blocks findable by hash now
    evictions: int  # cached blocks reclaimed for new content
    queries: dict[str, int]  # prompt tokens looked up, by model (adapter name, or the base model's name)
    hits: dict[str, int]  # prompt tokens found cached, by model

    @property
    def hit_rate(self) -> float:
        q = sum(self.queries.values())
        return sum(self.hits.values()) / q if q else 0.0


@dataclass(slots=True)
class EngineSnapshot:
    waiting: int
    running: int
    last_step_tokens: int
    kv_blocks_free: int
    kv_blocks_total: int
    adapters: AdapterStats
    prefix_cache: PrefixCacheSnapshot
    nonfinite_requests: dict[str, int] = field(default_factory=dict)  # model -> requests ended by NaN/inf activations


@dataclass(slots=True)
class EngineStats:
    """What the dashboard shows of the engine, read in one call between two steps."""

    snapshot: EngineSnapshot
    tiers: TierView
    batch: BatchHistory
    queued: dict[str, int]  # model (adapter name, or the base model's) -> requests waiting
    running: dict[str, int]  # model -> requests in the batch
    replica: str | None = None  # the cluster replica they come from; None: the engine in this process
