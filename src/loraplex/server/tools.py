"""Tool calling in OpenAI's shape, over any chat template.

Rendering: a chat template that knows tools (it mentions `tools`) gets them as transformers passes them; any
other template gets a system message listing the functions and the call format, Hermes-style
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (what Qwen's and Hermes' templates use). Earlier
assistant calls in the history are written back in that format; `tool` results keep their role.

tool_choice:
- "none": the tools are not offered; the answer is text.
- "auto" (the default with tools): offered; `<tool_call>` blocks in the output become `tool_calls`, the rest the
  content.
- "required": the output is constrained (engine/structured.py) to a JSON array of 1-8 calls (one object when
  parallel_tool_calls is false), each {"name": one of the tools, "arguments": matching its parameters schema};
  it always parses.
- {"type": "function", "function": {"name": ...}}: constrained to one call of that function.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from loraplex.sampling import StructuredOutput
from loraplex.server.errors import bad_request

MAX_PARALLEL_CALLS = 8  # with tool_choice required: a bound, so a model cannot list calls until max_tokens
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # the function definitions offered to the model ([] when none)
    constraint: StructuredOutput | None  # required / named: the output's JSON schema
    parse: bool  # auto: read <tool_call> blocks out of free text
    array: bool  # the constrained output is a list of calls

    @property
    def active(self) -> bool:
        return bool(self.constraint or self.parse)


def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}",
                       "tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request(f"tool {fn['name']!r}: parameters must be a JSON schema object", "tools")
        out.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    if len({f["name"] for f in out}) != len(out):
        raise bad_request("tool names must be unique", "tools")
    return out


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def plan(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan:
    """What a request's tools, tool_choice and parallel_tool_calls ask of rendering, decoding and parsing."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan([], None, False, False)
    fns = _functions(tools)
    if tool_choice == "none":
        return ToolPlan([], None, False, False)
    if tool_choice in (None, "auto"):
        return ToolPlan(fns, None, True, False)
    if tool_choice == "required":
        one = {"anyOf": [_call_schema(f) for f in fns]} if len(fns) > 1 else _call_schema(fns[0])
        many = parallel is not False
        schema = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS} if many else one
        return ToolPlan(fns, StructuredOutput("json_schema", json.dumps(schema)), False, many)
    chosen = [f for f in fns if f["name"] == _chosen_name(tool_choice)]
    if not chosen:
        raise bad_request(f"tool_choice must be none, auto, required or a function among the tools, got {tool_choice!r}",
                   "tool_choice")
    return ToolPlan(fns, StructuredOutput("json_schema", json.dumps(_call_schema(chosen[0]))), False, False)


def _chosen_name(tool_choice: Any) -> str | None:
    """The function a named tool_choice picks; a 400 for a `function` that is not {"name": ...} (OpenAI's shape)."""
    if not isinstance(tool_choice, dict):
        return None
    fn = tool_choice.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request('tool_choice naming a function must be {"type": "function", "function": {"name": ...}}, '
                          f"got function {fn!r}", "tool_choice")
    return fn["name"]


def system_prompt(fns: list[dict[str, Any]]) -> str:
    """The default tools prompt, for chat templates that do not render tools themselves."""
    listing = "\n".join(json.dumps({"type": "function", "function": f}) for f in fns)
    return ("You can call these functions:\n" + listing + "\nTo call a function, answer with one block per call: "
            '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>')


def history_text(content: str | None, tool_calls: list[dict[str, Any]] | None) -> str:
    """An assistant turn's text with its earlier tool calls written as <tool_call> blocks."""
    text = content or ""
    for call in tool_calls or []:
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request('assistant tool_calls must each be {"type": "function", "function": {"name": ..., '
                              f'"arguments": ...}}, got function {fn!r}', "messages")
        call_json = json.dumps({"name": fn["name"], "arguments": _arguments(fn.get("arguments"))})
        text += "<tool_call>" + call_json + "</tool_call>"
    return text


def _arguments(arguments: Any) -> Any:
    """An earlier call's arguments: OpenAI sends JSON text; an object (or array) is taken as it is, as vLLM does
    (clients that replay their own parsed calls send that), and none is {}."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, (dict, list)):
        return arguments
    if not isinstance(arguments, str):
        raise bad_request(f"assistant tool_calls function.arguments must be JSON text or an object, got "
                          f"{type(arguments).__name__}", "messages")
    try:
        return json.loads(arguments)
    except json.JSONDecodeError as e:
        raise bad_request(f"assistant tool_calls function.arguments is not valid JSON ({e})", "messages") from None


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def to_message(text: str, finish_reason: str | None, tp: ToolPlan) -> tuple[dict[str, Any], str | None]:
    """The assistant message (content and/or tool_calls) and finish_reason for one choice's output."""
    if not tp.active:
        return {"role": "assistant", "content": text}, finish_reason
    names = {f["name"] for f in tp.tools}
    calls: list[dict[str, Any]] = []
    content: str | None = text
    if tp.constraint is not None:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:  # cut off by max_tokens: no call to report
            return {"role": "assistant", "content": text}, finish_reason
        for c in parsed if tp.array else [parsed]:
            calls.append(_call(c["name"], c["arguments"]))
        content = None
    else:
        for m in _CALL.finditer(text):
            try:
                c = json.loads(m.group(1))
            except json.JSONDecodeError:
                continue
            if isinstance(c, dict) and c.get("name") in names:
                calls.append(_call(c["name"], c.get("arguments", {})))
        if calls:
            content = _CALL.sub("", text).strip() or None
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def stream_deltas(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished tool-calling message as streaming deltas: content first, then each call's id and name, then
    its arguments (they reassemble, by index, to `message`)."""
    deltas: list[dict[str, Any]] = []
    if message.get("content"):
        deltas.append({"content": message["content"]})
    for i, call in enumerate(message.get("tool_calls", [])):
        fn = call["function"]
        deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                       "function": {"name": fn["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
    return deltas
