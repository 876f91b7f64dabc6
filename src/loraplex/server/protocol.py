"""HTTP request and response bodies, in OpenAI's and vLLM's shapes.

Bodies are typed loosely enough that a well-formed request with an out-of-range value reaches
SamplingParams, whose error names the parameter (400); a body of the wrong shape, or with a field it does not
declare, is a 400 too (server/errors.py). Every list and
string a client sends is capped in size (the MAX_* below): past a cap the request is a 400 naming the field and
the limit (server/errors.py), before any tokenizing, template rendering or grammar compiling.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from loraplex.server.extras import CHAT, COMPLETION, SAMPLING, Refused, drop_defaults

# Size caps, each far above legitimate use; the body cap (server/guard.py, 4 MiB by default) bounds the whole
# request besides, so these bound the work one field can ask for, not the bytes.
MAX_MESSAGES = 4096  # messages in one chat: a long agent transcript is hundreds of turns
MAX_CONTENT_CHARS = 1 << 20  # one message's text (1 MiB): several times a 128k-token context
MAX_CONTENT_PARTS = 1024  # parts of one message's content: a document pasted in pieces
MAX_TOOL_CALLS = 128  # calls in one assistant turn of the history: as many as there can be tools
MAX_ID_CHARS = 1024  # tool_call_id, user, cache_salt, a modality: ids and hashes are tens of characters
MAX_MODEL_CHARS = 512  # model, tenant_id, lora_name: an adapter name with @version (HF repo ids are <= 96 + 96)
MAX_VERSION_CHARS = 256  # an adapter version: an integer, a date or a git hash
MAX_PATH_CHARS = 4096  # lora_path: Linux's PATH_MAX
MAX_PROMPT_CHARS = 4 << 20  # a prompt string (4 MiB): all the default body cap lets in; its tokens meet max_model_len
MAX_PROMPT_TOKENS = 1 << 20  # token ids in one prompt, or for /detokenize: a 1M-token context
MAX_PROMPTS = 64  # prompts in one completions request: the batch limit openai_routes has, checked before tokenizing
MAX_STOP = 16  # stop strings: OpenAI allows 4, vLLM any number; 16 covers several templates' end markers
MAX_STOP_CHARS = 1024  # one stop string: streaming holds back that many characters, and each step searches for it
MAX_STOP_TOKEN_IDS = 1024  # stop_token_ids: end-of-turn ids are a handful
MAX_LOGIT_BIAS = 4096  # logit_bias entries: a steered or banned word list; each is applied every step
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # allowed_token_ids: a whole vocabulary (the largest, Gemma's, is 256k)
MAX_BAD_WORDS = 1024  # bad_words: a block list, each tokenized and matched every step
MAX_BAD_WORD_CHARS = 1024  # one bad word or phrase
MAX_SCHEMA_CHARS = 64 << 10  # a JSON schema, regex or grammar as text: generated ones run to tens of KiB
MAX_CHOICES = 1024  # guided_choice options (all of them together also within MAX_SCHEMA_CHARS as JSON)
MAX_TOOLS = 128  # tools offered: OpenAI's limit
MAX_TOOL_NAME_CHARS = 256  # a function's name: OpenAI allows 64
MAX_TOOL_DESCRIPTION_CHARS = 64 << 10  # a function's description: a manual's worth; it is rendered into the prompt
MAX_TOOL_CHOICE_CHARS = 1024  # tool_choice as JSON: a mode or {"type": "function", "function": {"name": ...}}

# Error types of a field over its cap (pydantic's and _capped's): server/errors.py answers them with a 400.
CAP_ERRORS = frozenset({"too_long", "string_too_long", "field_cap"})


def _capped(size: int, limit: int, what: str, where: str = "") -> None:
    """A field_cap error naming the limit when size is over it (the field's name is in the error's loc; `where`,
    the part of the field, e.g. "item 3")."""
    if size > limit:
        raise PydanticCustomError("field_cap", f"{where + ': ' if where else ''}at most {limit} {what}, got {size}")


def _json_chars(value: Any, limit: int, where: str = "") -> None:
    """Cap a free-form JSON value by its serialized length: the work it can ask for is about proportional."""
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    except (RecursionError, TypeError, ValueError):  # nested past what json can write back: over any cap
        raise PydanticCustomError("field_cap", f"{where + ': ' if where else ''}at most {limit} characters as JSON, "
                                  "nested less deeply") from None
    _capped(size, limit, "characters as JSON", where)


def _strings(values: str | list[str] | None, count: int, chars: int) -> None:
    """A string, or a list of at most `count` strings, each at most `chars` long."""
    if isinstance(values, str):
        _capped(len(values), chars, "characters")
    elif values is not None:
        _capped(len(values), count, "items")
        for i, s in enumerate(values):
            _capped(len(s), chars, "characters", f"item {i}")


ModelName = Annotated[str, Field(max_length=MAX_MODEL_CHARS)]
Prompt = str | list[str] | list[int] | list[list[int]]
Id = Annotated[str, Field(max_length=MAX_ID_CHARS)]
Schema = Annotated[dict[str, Any], Field(description=f"at most {MAX_SCHEMA_CHARS} characters as JSON")]


class _Body(BaseModel):
    """A request body: a field it does not declare is a 400 naming it, never ignored; the fields of REFUSED
    (server/extras.py) are accepted at their defaults and refused by name at any other value."""

    model_config = ConfigDict(extra="forbid")
    REFUSED: ClassVar[dict[str, Refused]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        return drop_defaults(data, cls.REFUSED)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk (with include_usage)


class SamplingFields(_Body):
    """Sampling parameters shared by every generation endpoint (OpenAI's plus vLLM's extras)."""

    REFUSED = SAMPLING

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # vLLM's: prompt blocks are shared from the prefix cache only among requests with the same salt
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    user: Id | None = None  # OpenAI's end-user id: accepted and unused, but capped like any string
    safety_identifier: Id | None = None  # OpenAI's newer end-user id: the same
    prompt_cache_key: Id | None = None  # OpenAI's cache routing hint: one engine, whose prefix cache needs none
    request_id: Id | None = None  # vLLM's: the response's id is built from it (chatcmpl-<id>), as vLLM does
    # vLLM's: the order among the caller's own requests (lower first); other tenants' shares are untouched.
    priority: int = Field(default=0, ge=-(1 << 63), le=(1 << 63) - 1)
    # Logits processing (OpenAI's, then vLLM's extras) and log-probabilities (server/logprobs.py).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    repetition_penalty: float | None = None
    min_p: float | None = None
    allowed_token_ids: list[int] | None = Field(default=None, max_length=MAX_ALLOWED_TOKEN_IDS)
    bad_words: list[Annotated[str, Field(max_length=MAX_BAD_WORD_CHARS)]] | None = Field(default=None,
                                                                                        max_length=MAX_BAD_WORDS)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    # Structured outputs (engine/structured.py): OpenAI's response_format, or vLLM's extras; at most one.
    response_format: Schema | None = None
    structured_outputs: Schema | None = None
    guided_json: Schema | str | None = None
    guided_regex: str | None = Field(default=None, max_length=MAX_SCHEMA_CHARS)
    guided_choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES)
    guided_grammar: str | None = Field(default=None, max_length=MAX_SCHEMA_CHARS)

    @field_validator("stop")
    @classmethod
    def _stop_cap(cls, v: str | list[str] | None) -> str | list[str] | None:
        _strings(v, MAX_STOP, MAX_STOP_CHARS)
        return v

    @field_validator("response_format", "structured_outputs", "guided_json", "guided_choice")
    @classmethod
    def _schema_cap(cls, v: Any) -> Any:
        if isinstance(v, str):
            _capped(len(v), MAX_SCHEMA_CHARS, "characters")
        elif v is not None:
            _json_chars(v, MAX_SCHEMA_CHARS)
        return v


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (server/tools.py renders them)
    tool_call_id: Id | None = None  # a tool result: the call it answers
    name: Id | None = None  # a participant's name, passed to the chat template (which may use it)

    @field_validator("content")
    @classmethod
    def _content_cap(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(v, str):
            _capped(len(v), MAX_CONTENT_CHARS, "characters")
        elif v is not None:  # parts: together no more text than a string content
            _capped(len(v), MAX_CONTENT_PARTS, "parts")
            _json_chars(v, MAX_CONTENT_CHARS)
        return v

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls_cap(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v is not None:
            _capped(len(v), MAX_TOOL_CALLS, "items")
            _json_chars(v, MAX_CONTENT_CHARS)  # names and arguments are rendered into the prompt like content
        return v


class BeamFields(BaseModel):
    """vLLM's beam search (server/beams.py): n beams, ranked by log-probability over length ** length_penalty."""

    use_beam_search: bool = False
    length_penalty: float = 1.0


class ChatCompletionRequest(SamplingFields, BeamFields):
    REFUSED = CHAT

    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    n: int = 1  # capped in generation.choice_params (a 400 naming n); an int asks for no work before that
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _tools_cap(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """The parts of a tool that are read (server/tools.py): the function's name, description and parameters."""
        for i, tool in enumerate(v or []):
            fn = tool.get("function")
            if not isinstance(fn, dict):
                continue  # a 400 from tools.plan names the shape
            if isinstance(fn.get("name"), str):
                _capped(len(fn["name"]), MAX_TOOL_NAME_CHARS, "characters", f"item {i}: function.name")
            if isinstance(fn.get("description"), str):
                _capped(len(fn["description"]), MAX_TOOL_DESCRIPTION_CHARS, "characters",
                        f"item {i}: function.description")
            if fn.get("parameters") is not None:
                _json_chars(fn["parameters"], MAX_SCHEMA_CHARS, f"item {i}: function.parameters")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_cap(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, str):
            _capped(len(v), MAX_TOOL_CHOICE_CHARS, "characters")
        elif v is not None:
            _json_chars(v, MAX_TOOL_CHOICE_CHARS)
        return v


class CompletionRequest(SamplingFields, BeamFields):
    REFUSED = COMPLETION

    model: ModelName
    prompt: Prompt
    n: int = 1  # capped in generation.choice_params, as for chat
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    best_of: int | None = None  # refused unless 1 or n
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS and the like around a text prompt

    @field_validator("prompt")
    @classmethod
    def _prompt_cap(cls, v: Prompt) -> Prompt:
        if isinstance(v, str):
            _capped(len(v), MAX_PROMPT_CHARS, "characters")
        elif v and isinstance(v[0], int):  # one prompt as token ids
            _capped(len(v), MAX_PROMPT_TOKENS, "token ids")
        else:  # a batch of prompts
            _capped(len(v), MAX_PROMPTS, "prompts")
            for i, p in enumerate(v):
                _capped(len(p), MAX_PROMPT_CHARS if isinstance(p, str) else MAX_PROMPT_TOKENS,
                        "characters" if isinstance(p, str) else "token ids", f"item {i}")
        return v


class GenerateRequest(SamplingFields):
    """The simple tenant endpoint: `tenant_id` names the adapter (None or the base model's name = base)."""

    tenant_id: ModelName | None = None
    prompt: str = Field(max_length=MAX_CONTENT_CHARS)  # rendered as a chat message (by default), so a message's cap
    chat: bool = True  # render the prompt as one user message through the chat template


class GenerateResponse(BaseModel):
    response: str
    tenant_id: str | None
    finish_reason: str | None
    usage: Usage


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: ModelName | None = None
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: ModelName | None = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_TOKENS)


class LoadLoRARequest(_Body):
    lora_name: ModelName
    lora_path: str = Field(max_length=MAX_PATH_CHARS)
    version: str | None = Field(default=None, max_length=MAX_VERSION_CHARS)  # default: the next integer
    promote: bool = True  # make it the version new requests get
    # vLLM's: replace the adapter's weights under its name. Any load of a served name adds a version, which (with
    # promote) new requests get while those running finish on theirs: in place, either way.
    load_inplace: bool = False


class UnloadLoRARequest(_Body):
    lora_name: ModelName


class PromoteLoRARequest(_Body):
    lora_name: ModelName
    version: str = Field(max_length=MAX_VERSION_CHARS)


class PinLoRARequest(_Body):
    lora_name: ModelName
    pinned: bool = True


class ErrorInfo(BaseModel):
    message: str
    # OpenAI's: a client's error, the server's, or which per-minute limit a 429 hit
    type: Literal["invalid_request_error", "server_error", "requests", "tokens"]
    param: str | None = None  # the request field at fault
    code: str | None = None  # the cause, e.g. model_not_found, unknown_parameter (docs/serving.md lists them)


class ErrorResponse(BaseModel):
    error: ErrorInfo


GenerateResponse.model_rebuild()
