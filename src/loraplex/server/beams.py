"""vLLM's beam search behind chat and completions: `use_beam_search` with `n` beams (engine/beam_search.py).

What it honours: `n` (the width, at most 10), `max_tokens`, `temperature` (of the log-probabilities that rank the
beams; 0 ranks by the model's own), `ignore_eos`, `length_penalty`, and the ids and hints (`cache_salt`, `user`,
`request_id`). Any other generation field set is a 400 naming it, as vLLM's beam search does not use them either;
`stream` too, as the beams are known only at the end. The run: each step's beams are one-token engine requests,
batched with every other tenant's, all on the adapter version the first was admitted on; `n` places per prompt
are held in the bounded queue throughout, and a client that hangs up ends it between steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraplex.engine.beam_search import MAX_WIDTH, Beam, beam_search
from loraplex.engine.client import AdapterTarget, EngineStream
from loraplex.sampling import SamplingParams
from loraplex.server import auth
from loraplex.server.errors import APIError, bad_request
from loraplex.server.extras import same_value
from loraplex.server.protocol import SamplingFields
from loraplex.server.request_job import RequestJob, pinned_version, refused
from loraplex.server.stats.tracker import Tracker

# Fields beam search does not use, with the values that ask for nothing.
UNUSED: dict[str, tuple[object, ...]] = {
    "stream": (False,), "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0), "min_tokens": (0,),
    "seed": (None,), "stop": (None, "", []), "stop_token_ids": (None, []), "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0), "repetition_penalty": (None, 1.0), "logit_bias": (None, {}),
    "allowed_token_ids": (None,), "bad_words": (None, []), "logprobs": (None, False), "top_logprobs": (None,),
    "response_format": (None, {"type": "text"}), "structured_outputs": (None,), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,), "tools": (None, []),
    "echo": (False,),
}


def check(body: SamplingFields, n: int) -> None:
    """A 400 naming the first field beam search cannot honour, or a width out of range."""
    if not 1 <= n <= MAX_WIDTH:
        raise bad_request(f"use_beam_search takes n from 1 to {MAX_WIDTH} beams, got {n}", "n")
    for name, unset in UNUSED.items():
        if name not in type(body).model_fields:
            continue
        value = getattr(body, name)
        if not any(same_value(value, u) for u in unset):
            raise bad_request(f"{name} cannot be combined with use_beam_search: beam search ranks whole sequences "
                              "by their log-probability alone" + (" and returns them at the end" if name == "stream"
                                                                  else ""), name, "unsupported_parameter")


@dataclass(slots=True)
class BeamRun:
    beams: list[list[Beam]]  # per prompt, best first
    adapter: AdapterTarget  # the version (an AdapterKey) every step ran on; None: the base model


async def _final(stream: EngineStream, tracker: Tracker) -> Sequence[tuple[int, float]]:
    """A one-token request's most likely next tokens."""
    async for out in stream:
        tracker.saw(out)
        if out.finished:
            logprobs = out.outputs[0].logprobs
            return logprobs[0].top if logprobs else []
    return []


async def run(job: RequestJob, prompts: list[list[int]], width: int, max_tokens: int, body: Any) -> BeamRun:
    """Each prompt's best `width` beams (module docstring). The places are left and each prompt's outcome
    recorded however it ends."""
    st = job.st
    params = SamplingParams(max_tokens=1, temperature=body.temperature or 0.0, logprobs=2 * width)
    salt = auth.cache_salt(job.scope, job.cache_salt)
    eos = set(st.engine.facts.eos_token_ids)
    adapter: AdapterTarget = job.adapter
    key: AdapterTarget = None
    open_streams: list[EngineStream] = []
    job.enter(len(prompts) * width, sum(len(p) for p in prompts) * width + max_tokens * width * len(prompts))
    try:
        found = []
        for prompt in prompts:
            tracker = job.tracker(prompt)

            async def step(beams: list[list[int]], tracker: Tracker = tracker) -> list[Sequence[tuple[int, float]]]:
                nonlocal adapter, key
                if await job.request.is_disconnected():
                    raise APIError(499, "client disconnected", "client_closed_request")
                streams = []
                for tokens in beams:
                    streams.append(await st.engine.add(tokens, params, adapter, cache_salt=salt,
                                                       share=job.share))
                    open_streams.append(streams[-1])
                    adapter, key = pinned_version(streams[0], adapter), streams[0].adapter
                    tracker.admitted()
                return list(await asyncio.gather(*(_final(s, tracker) for s in streams)))

            try:
                found.append(await beam_search(step, prompt, width, max_tokens, eos, body.ignore_eos,
                                               body.length_penalty))
            except BaseException as e:
                refused(tracker, e)
                raise
            tracker.done("200")
        return BeamRun(found, key)
    finally:
        for s in open_streams:
            s.abort()  # a no-op for a finished request
        job.leave()
