"""Beam search as vLLM does it, over any engine (no torch).

Every step, each live beam is one engine request for one token, its prompt the beam's tokens so far (so the
prefix cache holds the K/V the beams share, and the beams of every request decode in the same batches as other
tenants' requests), asking for the 2 * width most likely next tokens. Candidates are ranked by cumulative
log-probability over length ** length_penalty (the length counts the prompt, and not a final EOS, as vLLM's
`get_beam_search_score`); a candidate ending in EOS is complete, and the best `width` of the others go on. After
`max_tokens` steps, or once none is live, the best `width` of all are the answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

# One step: the live beams' tokens -> for each, its most likely next tokens as (token id, log-probability).
Step = Callable[[list[list[int]]], Awaitable[list[Sequence[tuple[int, float]]]]]
MAX_WIDTH = 10  # 2 * width candidates per beam, within the 20 top log-probabilities an engine request returns


@dataclass(slots=True)
class Beam:
    tokens: list[int]  # the prompt's, then the generated ones
    cum_logprob: float = 0.0
    ended: bool = False  # by EOS, which is the last of `tokens`
    prompt_len: int = 0

    @property
    def generated(self) -> list[int]:
        """The generated tokens, without a final EOS."""
        return self.tokens[self.prompt_len:len(self.tokens) - int(self.ended)]

    def score(self, length_penalty: float) -> float:
        return self.cum_logprob / ((len(self.tokens) - int(self.ended)) ** length_penalty)


async def beam_search(step: Step, prompt: list[int], width: int, max_tokens: int, eos_ids: Collection[int],
                      ignore_eos: bool = False, length_penalty: float = 1.0) -> list[Beam]:
    """The best `width` beams, best first (module docstring)."""
    def rank(beams: list[Beam]) -> list[Beam]:
        return sorted(beams, key=lambda b: b.score(length_penalty), reverse=True)  # stable: earlier wins a tie

    live = [Beam(list(prompt), prompt_len=len(prompt))]
    ended: list[Beam] = []
    for _ in range(max_tokens):
        if not live:
            break
        candidates: list[Beam] = []
        for beam, top in zip(live, await step([b.tokens for b in live])):
            for token, logprob in top:
                child = Beam(beam.tokens + [token], beam.cum_logprob + logprob, prompt_len=beam.prompt_len)
                if token in eos_ids and not ignore_eos:
                    child.ended = True
                    ended.append(child)
                else:
                    candidates.append(child)
        live = rank(candidates)[:width]
    return rank(ended + live)[:width]
