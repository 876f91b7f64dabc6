"""A chat template in place of the tokenizer's own (vLLM's --chat-template), checked once when the engine starts
rather than on a tenant's first request."""

from __future__ import annotations

from typing import Any

from loraplex.errors import InvalidRequestError


def use_chat_template(tokenizer: Any, template: str) -> None:
    """Make `template` (Jinja text) the tokenizer's chat template; an InvalidRequestError if it does not render a
    one-message conversation (a syntax error, an undefined filter, a template that raises on it)."""
    tokenizer.chat_template = template
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # jinja2's TemplateError and whatever the template raises itself
        raise InvalidRequestError(f"chat template cannot render a user message: {type(e).__name__}: {e}") from None
    if "hi" not in text:
        raise InvalidRequestError("chat template renders a user message without its content")
