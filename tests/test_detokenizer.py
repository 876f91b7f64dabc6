"""Incremental detokenization and stop strings, with a tiny fake tokenizer (no model, no real tokenizer)."""

from __future__ import annotations

from loraplex.engine import detokenizer
from loraplex.engine.request import Request, RequestStatus
from loraplex.sampling import SamplingParams


class ByteTokenizer:
    """Token id i < 256 is the byte i; decode is UTF-8 with replacement, like a byte-level BPE tokenizer."""

    special = {300: "<eos>"}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = b""
        for i in ids:
            if i in self.special:
                if not skip_special_tokens:
                    out += self.special[i].encode()
                continue
            out += bytes([i])
        return out.decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def make(prompt: str = "Q: ", **sampling: object) -> Request:
    req = Request("r", ids(prompt), SamplingParams(max_tokens=100, **sampling), None, 0.0)  # type: ignore[arg-type]
    detokenizer.init_offsets(req)
    return req


def feed(req: Request, tok: ByteTokenizer, token: int) -> tuple[bool, str]:
    """What the engine does per sampled token: append, decode, check stop strings, take the streamed delta."""
    req.output_token_ids.append(token)
    before = len(req.output_text)
    detokenizer.append_text(tok, req)
    stopped = detokenizer.find_stop(req, len(req.output_text) - before)
    if stopped:
        req.status = RequestStatus.FINISHED
    return stopped, detokenizer.take_delta(req)


def run(req: Request, tokens: list[int], finish_at_end: bool = True) -> list[str]:
    tok = ByteTokenizer()
    deltas = []
    for i, t in enumerate(tokens):
        if i == len(tokens) - 1 and finish_at_end:
            req.status = RequestStatus.FINISHED  # e.g. max_tokens reached on the last token
        stopped, delta = feed(req, tok, t)
        deltas.append(delta)
        if stopped:
            break
    return deltas


# ---- append_text -------------------------------------------------------------------------------------


def test_append_text_decodes_tokens_one_by_one() -> None:
    """Feeding tokens one at a time yields the same text as decoding them all at once."""
    req = make()
    run(req, ids("hello world"), finish_at_end=False)
    assert req.output_text == "hello world"


def test_append_text_waits_for_a_complete_utf8_character() -> None:
    """A multi-byte character split over tokens is emitted only once complete, never as U+FFFD."""
    req = make()
    tok = ByteTokenizer()
    seen = []
    for t in ids("aé€b"):
        req.output_token_ids.append(t)
        detokenizer.append_text(tok, req)
        seen.append(req.output_text)
    assert seen == ["a", "a", "aé", "aé", "aé", "aé€", "aé€b"]
    assert all("\ufffd" not in s for s in seen)


def test_append_text_skips_special_tokens() -> None:
    """Special tokens decode to nothing in the output text."""
    req = make()
    run(req, [*ids("ab"), 300, *ids("c")], finish_at_end=False)
    assert req.output_text == "abc"


# ---- find_stop -------------------------------------------------------------------------------------------


def test_find_stop_truncates_before_the_stop_string() -> None:
    """A stop string in the new text ends generation; the text is cut before it and stop_reason names it."""
    req = make(stop=["STOP"])
    req.output_text = "abc STOP def"
    assert detokenizer.find_stop(req, new_chars=len(req.output_text))
    assert req.output_text == "abc " and req.stop_reason == "STOP"


def test_find_stop_include_stop_str_in_output() -> None:
    """With include_stop_str_in_output the text keeps the stop string (and nothing after it)."""
    req = make(stop=["STOP"], include_stop_str_in_output=True)
    req.output_text = "abc STOP def"
    assert detokenizer.find_stop(req, new_chars=len(req.output_text))
    assert req.output_text == "abc STOP"


def test_find_stop_detects_a_stop_string_spanning_old_and_new_text() -> None:
    """A stop string that starts in earlier text and ends in the newest characters is found."""
    req = make(stop=["STOP"])
    req.output_text = "xxST" + "OPyy"
    assert detokenizer.find_stop(req, new_chars=4)
    assert req.output_text == "xx"


def test_find_stop_only_looks_at_text_ending_in_the_new_characters() -> None:
    """No stop string in the newest text: nothing is truncated and False is returned."""
    req = make(stop=["STOP", "zz"])
    req.output_text = "abcdef"
    assert not detokenizer.find_stop(req, new_chars=2)
    assert req.output_text == "abcdef" and req.stop_reason is None
    assert not detokenizer.find_stop(make(), new_chars=3)  # no stop strings at all


def test_find_stop_cuts_at_the_earliest_stop_string() -> None:
    """When several stop strings appear in the new text, the text is cut at the earliest, whatever the list order."""
    req = make(stop=["world", "lo"])
    req.output_text = "hello world"
    assert detokenizer.find_stop(req, new_chars=len(req.output_text))
    assert req.output_text == "hel" and req.stop_reason == "lo"


# ---- take_delta (streaming) -------------------------------------------------------------------------------


def test_take_delta_holds_back_a_possible_stop_prefix_while_running() -> None:
    """While running, the last len(longest stop) - 1 characters are held back; finishing flushes them."""
    req = make(stop=["END", "X"])
    req.output_text = "abcdEN"
    assert detokenizer.take_delta(req) == "abcd"  # "EN" might become "END"
    assert detokenizer.take_delta(req) == ""  # nothing new
    req.output_text += "o"
    assert detokenizer.take_delta(req) == "E"
    req.status = RequestStatus.FINISHED
    assert detokenizer.take_delta(req) == "No"
    assert req.emitted_text_len == len(req.output_text)


def test_take_delta_without_stop_strings_sends_everything_at_once() -> None:
    """With no stop strings nothing is held back."""
    req = make()
    req.output_text = "abc"
    assert detokenizer.take_delta(req) == "abc"


def test_streamed_deltas_never_contain_a_stop_string() -> None:
    """Token by token, the streamed deltas are always a prefix of the final text and add up to it exactly."""
    for include in (False, True):
        req = make(stop=["</ans>"], include_stop_str_in_output=include)
        deltas = run(req, ids("the answer is 42</ans> and then more"), finish_at_end=False)
        final = "the answer is 42" + ("</ans>" if include else "")
        assert req.output_text == final and req.finished and req.stop_reason == "</ans>"
        streamed = ""
        for d in deltas:
            streamed += d
            assert final.startswith(streamed)
        assert streamed == final
        assert "<" not in "".join(deltas[:-1])  # the partial stop string was never sent early


def test_streaming_flushes_everything_when_finished_by_length() -> None:
    """A request that ends without a stop string (max_tokens) sends the held-back tail in its last delta."""
    req = make(stop=["STOP!"])
    deltas = run(req, ids("abcdefST"))
    assert deltas == ["", "", "", "", "a", "b", "c", "defST"]  # 4 chars held while running, then flushed
