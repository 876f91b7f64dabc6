"""Incremental detokenization and stop-string handling.

Decoding only a short window of tokens each step keeps the cost flat in the output length; a
few prompt tokens lead the window so tokenizers that merge leading spaces decode correctly.
Streamed text lags by (longest stop string - 1) characters so a stop string is never sent in part.
"""

from __future__ import annotations

from typing import Any

from loraplex.engine.request import Request

_WINDOW = 5


def init_offsets(req: Request) -> None:
    n = len(req.prompt_token_ids)
    req.prefix_offset = max(n - _WINDOW, 0)
    req.read_offset = n


def _ids(req: Request, start: int, end: int) -> list[int]:
    return [req.token_at(i) for i in range(start, end)]


def append_text(tokenizer: Any, req: Request) -> None:
    """Decode the newest token(s) into req.output_text."""
    end = req.num_tokens
    prefix = tokenizer.decode(_ids(req, req.prefix_offset, req.read_offset), skip_special_tokens=True)
    full = tokenizer.decode(_ids(req, req.prefix_offset, end), skip_special_tokens=True)
    # U+FFFD at the end: an incomplete UTF-8 sequence; wait for the next token.
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        req.output_text += full[len(prefix) :]
        req.prefix_offset = req.read_offset
        req.read_offset = end


def find_stop(req: Request, new_chars: int) -> bool:
    """Truncate at the earliest stop string that ends in the newest text; True if one was found."""
    stops = req.sampling.stop
    if not stops:
        return False
    text = req.output_text
    best: tuple[int, str] | None = None
    for s in stops:
        idx = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)  # the earliest in the text wins, not the first in the list
    if best is None:
        return False
    idx, s = best
    req.output_text = text[: idx + len(s)] if req.sampling.include_stop_str_in_output else text[:idx]
    req.stop_reason = s
    return True


def take_delta(req: Request) -> str:
    """Text not yet sent: everything when finished, else all but a possible stop-string prefix."""
    hold = 0 if req.finished else max((len(s) for s in req.sampling.stop), default=1) - 1
    end = max(req.emitted_text_len, len(req.output_text) - hold)
    delta = req.output_text[req.emitted_text_len : end]
    req.emitted_text_len = end
    return delta
