"""HTTP request and response bodies, in OpenAI's and vLLM's shapes.

Bodies are typed loosely enough that a well-formed request with an out-of-range value reaches
SamplingParams, whose error names the parameter (400); a body of the wrong shape is a 422.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields such as `user`; they change nothing


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk (with include_usage)


class SamplingFields(_Body):
    """Sampling parameters shared by every generation endpoint (OpenAI's plus vLLM's extras)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # vLLM's: prompt blocks are shared from the prefix cache only among requests with the same salt
    cache_salt: str | None = Field(default=None, min_length=1)
    # Logits processing (OpenAI's, then vLLM's extras) and log-probabilities (server/logprobs.py).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    # Structured outputs (engine/structured.py): OpenAI's response_format, or vLLM's extras; at most one.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (server/tools.py renders them)
    tool_call_id: str | None = None  # a tool result: the call it answers


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    # OpenAI fields this server does not implement: refused by name when set (UNSUPPORTED_CHAT), never ignored.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None


UNSUPPORTED_CHAT = {"functions": "use tools", "function_call": "use tool_choice", "audio": "text only",
                    "prediction": "no predicted outputs", "web_search_options": "no web search"}


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class GenerateRequest(SamplingFields):
    """The simple tenant endpoint: `tenant_id` names the adapter (None or the base model's name = base)."""

    tenant_id: str | None = None
    prompt: str
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

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class LoadLoRARequest(_Body):
    lora_name: str
    lora_path: str
    version: str | None = None  # default: the next integer
    promote: bool = True  # make it the version new requests get


class UnloadLoRARequest(_Body):
    lora_name: str


class PromoteLoRARequest(_Body):
    lora_name: str
    version: str


class PinLoRARequest(_Body):
    lora_name: str
    pinned: bool = True


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


GenerateResponse.model_rebuild()
