"""Exception types a user can cause. Each names its cause; the server maps them to HTTP statuses."""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class of every error loraplex raises on purpose. `code`: the OpenAI-style error code the HTTP API
    answers it with (server/errors.py; docs/serving.md lists them)."""

    code = "invalid_value"


class UnsupportedModelError(LoraplexError):
    """The model's architecture or one of its config features is not supported."""

    code = "unsupported_model"


class ModelLoadError(LoraplexError):
    """A model directory or file could not be read."""

    code = "model_load_failed"


class EngineUnavailableError(LoraplexError):
    """No engine can take the request now (shut down, or its replica died): retry later (HTTP 503)."""

    code = "engine_unavailable"


class InvalidRequestError(LoraplexError):
    """A request parameter is out of range or inconsistent."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the tokens to generate) does not fit the context."""

    code = "context_length_exceeded"  # OpenAI's


class NonFiniteOutputError(LoraplexError):
    """A request's own activations became NaN or infinite (its adapter's weights, finite and within the load
    bound, overflowed on its input): that request ends with this error (HTTP 422), no other is touched."""

    code = "non_finite_output"


class AdapterError(LoraplexError):
    """Base class of adapter problems."""

    code = "invalid_adapter"


class AdapterNotFoundError(AdapterError):
    """No adapter directory or registry entry exists for the name or path."""

    code = "model_not_found"  # OpenAI's: an adapter is a model to the API


class InvalidAdapterNameError(AdapterError):
    """An adapter name that could escape the adapter root or is otherwise malformed."""

    code = "invalid_adapter_name"


class AdapterVersionExistsError(AdapterError):
    """A registration names a version the adapter has (or had): versions are immutable, never reused."""

    code = "adapter_version_exists"


class AdapterFormatError(AdapterError):
    """The adapter files are missing, corrupt, or not in PEFT's format."""


class AdapterIncompatibleError(AdapterError):
    """The adapter's tensors do not fit the base model's shapes."""

    code = "adapter_incompatible"


class AdapterRankError(AdapterError):
    """The adapter's rank exceeds the engine's --max-lora-rank."""

    code = "adapter_rank_exceeded"


class UnsupportedAdapterFeatureError(AdapterError):
    """The adapter uses a PEFT feature loraplex refuses to ignore silently."""

    code = "unsupported_adapter_feature"


class StateWriteError(LoraplexError):
    """Persistent state (the adapter registry) could not be written: the change was not applied."""

    def __init__(self, message: str, disk_full: bool) -> None:
        super().__init__(message)
        self.disk_full = disk_full  # ENOSPC/EDQUOT: HTTP 507; any other write failure: 503
