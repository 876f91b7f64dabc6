"""Request: one generation's state as it moves through waiting -> running -> finished."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from collections.abc import Hashable
from typing import Any

from loraplex.adapters.key import AdapterKey
from loraplex.sampling import SamplingParams, TokenLogprobs


@dataclass(frozen=True, slots=True)
class Share:
    """Whose share of the batch a request takes (engine/fair_share.py): its tenant (None: the engine's default, the
    adapter's name, the base model one tenant), the tenant's weight, and vLLM's `priority` within the tenant (lower
    first)."""

    tenant: str | None = None
    weight: float = 1.0
    priority: int = 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterKey | None  # the adapter version it runs on, None = base model
    arrival: float
    prompt: str | None = None
    tenant: Hashable = None  # whose share of the batch it is (engine/fair_share.py); None: one tenant of its own
    weight: float = 1.0  # its tenant's weight: shares of the batch are proportional to it
    priority: int = 0  # vLLM's: the order within its tenant, lower first (then arrival)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token, when asked
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # of prompt tokens 1.., when asked
    bad_words_ids: list[list[int]] = field(default_factory=list)  # SamplingParams.bad_words, tokenized
    matcher: Any = None  # llguidance.LLMatcher when SamplingParams.structured is set (engine/structured.py)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    lora_slot: int = -1
    times_passed_over: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # Prefix caching (engine/block_manager.py): the hash-chain root (set at first admission), the chain of the
    # full blocks hashed so far, how many of its blocks are findable, the prompt tokens found cached.
    cache_salt: str | None = None
    cache_namespace: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0
    num_cached_tokens: int = 0
    stop_reason: str | int | None = None
    # Incremental detokenization state (see engine/detokenizer.py).
    output_text: str = ""
    emitted_text_len: int = 0
    emitted_token_len: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]
