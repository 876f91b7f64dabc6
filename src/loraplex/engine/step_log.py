"""StepLog: what the last engine steps computed — tokens per adapter (prefill and decode), batch size, KV
blocks in use, queue depth — and tokens per second over the last minutes. No torch.

Both rings are fixed-size (deque maxlen), so a server that runs for months holds the same few kilobytes. The
engine thread records; readers copy between steps (through AsyncLLMEngine.call), so no lock is needed.
Recording is one pass over the step's sequences — the pass that counts the step's tokens already makes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from loraplex.engine.scheduler import ScheduledSeq

STEPS_KEPT = 128  # the steps the dashboard's batch panel can show
SECONDS_KEPT = 120  # the throughput series: one point per second


@dataclass(frozen=True, slots=True)
class StepRecord:
    time: float  # unix time at the end of the step
    duration: float  # seconds the forward pass took
    num_seqs: int  # requests in the batch
    tokens: dict[str, tuple[int, int]]  # model (adapter name, or the base model's) -> (prefill, decode) tokens
    kv_blocks_used: int
    queue_depth: int  # requests waiting after the step was scheduled


@dataclass(frozen=True, slots=True)
class ThroughputPoint:
    second: int  # unix time, whole seconds
    prefill_tokens: int
    decode_tokens: int
    steps: int


@dataclass(frozen=True, slots=True)
class BatchHistory:
    steps: list[StepRecord]  # oldest first
    throughput: list[ThroughputPoint]  # oldest first; seconds without a step are absent


class StepLog:
    def __init__(self, base_label: str, steps_kept: int = STEPS_KEPT, seconds_kept: int = SECONDS_KEPT) -> None:
        self.base_label = base_label
        self._steps: deque[StepRecord] = deque(maxlen=steps_kept)
        self._seconds: deque[list[int]] = deque(maxlen=seconds_kept)  # [second, prefill, decode, steps]

    def record(self, seqs: list[ScheduledSeq], duration: float, kv_blocks_used: int, queue_depth: int) -> int:
        """Record one step; call it before the scheduler advances the sequences. Returns the step's tokens."""
        tokens: dict[str, tuple[int, int]] = {}
        prefill_total = decode_total = 0
        for s in seqs:
            req = s.request
            label = self.base_label if req.adapter is None else req.adapter.name
            prefill, decode = tokens.get(label, (0, 0))
            # Prompt positions (or a preempted request's recomputation) are prefill; the rest is decoding.
            if req.num_computed_tokens < len(req.prompt_token_ids) or s.num_tokens > 1:
                tokens[label] = (prefill + s.num_tokens, decode)
                prefill_total += s.num_tokens
            else:
                tokens[label] = (prefill, decode + 1)
                decode_total += 1
        now = time.time()
        self._steps.append(StepRecord(now, duration, len(seqs), tokens, kv_blocks_used, queue_depth))
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            bucket = self._seconds[-1]
            bucket[1] += prefill_total
            bucket[2] += decode_total
            bucket[3] += 1
        else:
            self._seconds.append([second, prefill_total, decode_total, 1])
        return prefill_total + decode_total

    def history(self) -> BatchHistory:
        return BatchHistory(list(self._steps), [ThroughputPoint(*b) for b in self._seconds])
