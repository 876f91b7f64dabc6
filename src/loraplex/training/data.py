"""Training data: JSONL in three formats, tokenized with a loss mask on completion / assistant tokens only.

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   chat template; loss on assistant turns
    {"prompt": "...", "completion": "..."}                               plain text; loss on the completion (+ EOS)
    {"text": "..."}                                                      plain text; loss on every token
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import LoraplexError

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss


class DatasetError(LoraplexError):
    """A training or evaluation file that cannot be used, with the line that is wrong."""


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append({"__line__": n, **row})
    if not rows:
        raise DatasetError(f"{path}: the dataset is empty")
    return rows


def _messages_example(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Example:
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and
                               m.get("role") in ("system", "user", "assistant") for m in messages):
        raise DatasetError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, content: str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: a conversation needs at least one assistant message to learn from")
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # Tokens the template adds for turn i = render(up to i) minus render(before i, generation prompt).
        before = tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
        if list(upto[: len(before)]) != list(before) or list(ids[: len(upto)]) != list(upto):
            raise DatasetError(f"{where}: the chat template does not render conversations incrementally; "
                               "use the prompt/completion format instead")
        labels[len(before) : len(upto)] = ids[len(before) : len(upto)]
    return Example(ids, labels)


def to_example(tokenizer: Any, row: dict[str, Any], where: str) -> Example:
    if "messages" in row:
        return _messages_example(tokenizer, row["messages"], where)
    if "prompt" in row and "completion" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise DatasetError(f"{where}: 'prompt' and 'completion' must be strings")
        prompt = list(tokenizer.encode(row["prompt"]))
        completion = list(tokenizer.encode(row["completion"], add_special_tokens=False)) + [tokenizer.eos_token_id]
        return Example(prompt + completion, [IGNORE] * len(prompt) + completion)
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise DatasetError(f"{where}: 'text' must be a non-empty string")
        ids = list(tokenizer.encode(row["text"])) + [tokenizer.eos_token_id]
        return Example(ids, list(ids))
    keys = ", ".join(k for k in row if k != "__line__") or "none"
    raise DatasetError(f"{where}: unknown format (keys: {keys}); expected 'messages', 'prompt'+'completion', or 'text'")


def load_dataset(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize every line; truncate examples longer than max_length (warning with their count)."""
    examples, truncated = [], 0
    for row in read_jsonl(path):
        ex = to_example(tokenizer, row, f"{path}:{row['__line__']}")
        if len(ex.input_ids) > max_length:
            truncated += 1
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if all(label == IGNORE for label in ex.labels[1:]):
            raise DatasetError(f"{path}:{row['__line__']}: no completion tokens left to learn from "
                               f"(after truncation to --max-length {max_length})")
        examples.append(ex)
    if truncated:
        log.warning("%s: %d of %d examples are longer than --max-length %d and were truncated",
                    path, truncated, len(examples), max_length)
    return examples
