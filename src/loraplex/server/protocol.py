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
    # Accepted only at their neutral values: anything else is refused rather than silently ignored.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


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
