"""Request fields loraplex knows and does not implement (vLLM's extras, OpenAI's newer fields), by endpoint.

Each is accepted at the values that ask for nothing (clients send defaults explicitly) and refused by name at any
other, with why: never silently ignored. A field in neither a body model (server/protocol.py) nor these tables is
a 400 as an unknown parameter. Values are only compared, never read, so they need no size caps of their own (the
body cap bounds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Refused:
    defaults: tuple[object, ...]  # the values that ask for nothing: accepted and dropped
    why: str


_NO_BEAMS = "beam search runs on /v1/chat/completions and /v1/completions"
_NO_DISAGG = "this server has no disaggregated prefill or encoder cache"

SAMPLING: dict[str, Refused] = {
    "use_beam_search": Refused((False,), _NO_BEAMS),
    "length_penalty": Refused((1, 1.0), "a beam search setting; " + _NO_BEAMS),
    "skip_special_tokens": Refused((True,), "special tokens are always left out of the output text"),
    "spaces_between_special_tokens": Refused((True,), "special tokens are always left out of the output text"),
    "truncate_prompt_tokens": Refused((None,), "prompts are never truncated: a prompt over the context is a 400"),
    "truncation_side": Refused((None,), "prompts are never truncated: a prompt over the context is a 400"),
    "prompt_logprobs": Refused((None,), "prompt log-probabilities come with echo and logprobs on /v1/completions"),
    "logprob_token_ids": Refused((None,), "log-probabilities are of the top tokens (logprobs, top_logprobs)"),
    "watermarking": Refused((None, False), "no watermarking"),
    "session_id": Refused((None,), "no session routing: one engine serves every request"),
    "return_tokens_as_token_ids": Refused((None, False), "log-probability tokens are returned as text"),
    "return_token_ids": Refused((None, False), "token ids are not returned; /tokenize gives a prompt's"),
    "return_token_offsets": Refused((None, False), "no render endpoints"),
    "return_mm_kwargs": Refused((True,), "text only"),
    "routed_experts_prompt_start": Refused((0,), "no mixture-of-experts routing data"),
    "kv_transfer_params": Refused((None,), _NO_DISAGG),
    "ec_transfer_params": Refused((None,), _NO_DISAGG),
    "vllm_xargs": Refused((None,), "no custom request extensions"),
    "logits_processors": Refused((None,), "no custom logits processors: a request never names code to run"),
    "repetition_detection": Refused((None,), "no repetition detection; repetition_penalty and frequency_penalty "
                                    "are supported"),
    "thinking_token_budget": Refused((None, -1), "no reasoning-model token budgets"),
    "stream_interval": Refused((None, 1), "a stream sends every token as it is made"),
    "structural_tag": Refused((None,), "structured outputs: json, json_object, regex, choice, grammar"),
    "guided_decoding_backend": Refused((None,), "one structured-output backend (llguidance), not chosen per request"),
    "guided_whitespace_pattern": Refused((None,), "JSON whitespace is the grammar's default"),
    "prompt_embeds": Refused((None,), "prompts are text or token ids"),
    "store": Refused((None, False), "completions are not stored"),
    "metadata": Refused((None, {}), "completions are not stored, so there is nothing to tag"),
    "service_tier": Refused((None, "auto", "default"), "one service tier"),
}

# Beam search's fields: implemented on chat and completions (server/beams.py), refused on /generate.
_OPENAI = {k: v for k, v in SAMPLING.items() if k not in ("use_beam_search", "length_penalty")}

CHAT: dict[str, Refused] = {
    **_OPENAI,
    "functions": Refused((None,), "use tools"),
    "function_call": Refused((None,), "use tool_choice"),
    "audio": Refused((None,), "text only"),
    "modalities": Refused((None, ["text"]), "text only"),
    "prediction": Refused((None,), "no predicted outputs"),
    "web_search_options": Refused((None,), "no web search"),
    "reasoning_effort": Refused((None,), "no reasoning models"),
    "include_reasoning": Refused((None, True), "no reasoning models"),
    "verbosity": Refused((None,), "no verbosity control"),
    "echo": Refused((None, False), "chat responses hold the reply only"),
    "add_generation_prompt": Refused((True,), "the assistant's turn is always opened"),
    "continue_final_message": Refused((False,), "the assistant's turn is always a new one"),
    "add_special_tokens": Refused((False,), "the chat template places the special tokens"),
    "chat_template": Refused((None,), "a request cannot bring its own template; the server's (--chat-template) "
                             "renders every chat"),
    "chat_template_kwargs": Refused((None, {}), "a request cannot pass variables to the chat template"),
    "documents": Refused((None,), "no retrieval documents in the template"),
    "mm_processor_kwargs": Refused((None,), "text only"),
    "media_io_kwargs": Refused((None,), "text only"),
}

COMPLETION: dict[str, Refused] = {
    **_OPENAI,
    "suffix": Refused((None, ""), "no fill-in-the-middle"),
}


def same_value(value: object, default: object) -> bool:
    """value == default, with booleans and numbers kept apart (False is not 0 here)."""
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def drop_defaults(data: Any, table: dict[str, Refused]) -> Any:
    """A body with the table's fields at their defaults dropped; one at any other value is a 400 naming it (a
    PydanticCustomError whose ctx carries the field: server/errors.invalid_body reads it)."""
    if not isinstance(data, dict) or not table:
        return data
    kept = {}
    for key, value in data.items():
        rule = table.get(key)
        if rule is None:
            kept[key] = value
        elif not any(same_value(value, d) for d in rule.defaults):
            raise PydanticCustomError("unsupported_parameter", "{param} is not supported by this server ({why})",
                                      {"param": key, "why": rule.why})
    return kept
