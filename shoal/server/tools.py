"""Tool calling: which call format a model writes (from its chat template), how the tools reach the prompt,
the grammar that constrains calls, and parsing the output back into OpenAI tool calls, whole or streamed.

Formats: Hermes / Qwen2.5 (`<tool_call>{"name", "arguments"}</tool_call>`) and Llama 3.x (a bare JSON
`{"name", "parameters"}` object). A template that does not render tools gets them in a system message, with
the Hermes format asked for (the generic fallback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shoal.engine.structured_output import JSON_STYLE
from shoal.server.protocol import FunctionCall, NamedToolChoice, Tool, ToolCall, random_id


@dataclass(frozen=True)
class ToolFormat:
    name: str
    begin: str  # what opens a call ("" for a bare JSON object)
    end: str  # what closes one
    arguments_key: str  # "arguments" or "parameters"
    separator: str = "\n"  # between parallel calls


HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments")
LLAMA3 = ToolFormat("llama3", "", "", "parameters", separator="; ")
FORMATS = {f.name: f for f in (HERMES, LLAMA3)}

FALLBACK_PROMPT = """You can call these tools (JSON schemas of their parameters):
{tools}

To call a tool, answer with one line per call, and nothing else:
<tool_call>
{{"name": "<tool name>", "arguments": {{<its arguments as JSON>}}}}
</tool_call>
Results come back in messages of role "tool". Answer normally when no tool is needed."""


def template_format(template: str | None) -> tuple[ToolFormat, bool]:
    """(the call format, whether the template renders tools itself)."""
    text = template or ""
    renders_tools = "tools" in text
    if "<|python_tag|>" in text or ("<|start_header_id|>" in text and renders_tools):
        return LLAMA3, renders_tools
    return HERMES, renders_tools


@dataclass
class ToolPlan:
    """What one chat request's tools mean for its prompt, its constraint and its answer."""

    tools: list[Tool]
    choice: str | NamedToolChoice  # "auto" | "required" | a named function
    parallel: bool
    format: ToolFormat
    renders_tools: bool

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    @property
    def offered(self) -> list[Tool]:
        if isinstance(self.choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.choice.function.name]
        return self.tools

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.renders_tools else None

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the template should see it: tool calls' arguments as objects; without tool
        support in the template, the tools in a system message and calls and results written as text."""
        if self.renders_tools:
            return [_arguments_as_objects(m) for m in messages]
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in self.offered)
        system = FALLBACK_PROMPT.format(tools=described)
        rest = [_as_text(m, self.format) for m in messages]
        if rest and rest[0]["role"] == "system":
            return [{"role": "system", "content": f"{rest[0]['content']}\n\n{system}"}, *rest[1:]]
        return [{"role": "system", "content": system}, *rest]

    def call_schema(self) -> dict[str, Any]:
        """A JSON schema that exactly the allowed calls match (the name, then schema-valid arguments)."""
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    self.format.arguments_key: t.function.parameters or {"type": "object"},
                },
                "required": ["name", self.format.arguments_key],
                "additionalProperties": False,
            }
            for t in self.offered
        ]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {**schema, "x-guidance": JSON_STYLE}

    def grammar(self) -> str:
        """A Lark grammar (llguidance's): with a forced choice, one call (or several) from the first token;
        with auto, free text until a call begins, then only a well-formed call."""
        fmt = self.format
        more = f" ({json.dumps(fmt.separator)} call)*" if self.parallel else ""
        body = (
            f"call_json {_literal(fmt.end)}{more}"  # the first call's opening is matched by the rule before
        )
        lines = [
            f"call: {_literal(fmt.begin)} call_json {_literal(fmt.end)}",
            f"call_json: %json {json.dumps(self.call_schema())}",
        ]
        if self.forced:
            lines.insert(0, f"start: {_literal(fmt.begin)} {body}")
        elif fmt.begin:
            lines[:0] = [
                "start: TEXT | opened",
                f"opened: trigger {body}",
                f"trigger[lazy]: TEXT {json.dumps(fmt.begin)}",
                "TEXT: /(.|\\n)*/",
            ]
        else:  # a bare JSON object: text that does not start with '{', or calls
            lines[:0] = [f"start: TEXT | {body}", "TEXT: /[^{](.|\\n)*/"]
        return "\n".join(lines)


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass
        converted.append({**call, "function": function})
    return {**message, "tool_calls": converted}


def _as_text(message: dict[str, Any], fmt: ToolFormat) -> dict[str, Any]:
    if message.get("role") == "tool":
        return {
            "role": "user",
            "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>",
        }
    calls = message.get("tool_calls")
    if not calls:
        return {**message, "content": message.get("content") or ""}
    written = [
        f"{fmt.begin}{json.dumps({'name': c['function']['name'], fmt.arguments_key: _arguments(c)})}{fmt.end}"
        for c in calls
    ]
    text = (message.get("content") or "") + fmt.separator.join(written)
    return {"role": message["role"], "content": text}


def _arguments(call: dict[str, Any]) -> Any:
    arguments = call["function"].get("arguments") or "{}"
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


# ---------------------------------------------------------------- parsing


def parse_calls(text: str, fmt: ToolFormat) -> tuple[str | None, list[ToolCall]]:
    """(the content before the calls, or None; the calls) of a whole answer. Text that is not a call in
    the format stays content."""
    start = _call_start(text, fmt)
    if start is None:
        return text, []
    calls = _decode_calls(text[start:], fmt)
    if not calls:
        return text, []
    content = text[:start].strip()
    return content or None, calls


def _call_start(text: str, fmt: ToolFormat) -> int | None:
    if fmt.begin:
        index = text.find(fmt.begin.strip())
        return None if index < 0 else index
    stripped = text.lstrip()
    if stripped.startswith("<|python_tag|>"):
        return text.index("<|python_tag|>")
    return len(text) - len(stripped) if stripped.startswith("{") else None


def _decode_calls(text: str, fmt: ToolFormat) -> list[ToolCall]:
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    rest = text.replace("<|python_tag|>", "", 1)
    marker = fmt.begin.strip()
    while True:
        rest = rest.lstrip().lstrip(";").lstrip()
        if marker:
            if not rest.startswith(marker):
                break
            rest = rest[len(marker) :].lstrip()
        try:
            value, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        objects.append(value)
        rest = rest[end:].lstrip()
        if fmt.end.strip() and rest.startswith(fmt.end.strip()):
            rest = rest[len(fmt.end.strip()) :]
        if not rest.strip():
            break
    return [c for c in (_as_call(o, fmt) for o in objects) if c is not None]


def _as_call(value: Any, fmt: ToolFormat) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(fmt.arguments_key, value.get("arguments", value.get("parameters", {})))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=random_id("call_"), function=FunctionCall(name=value["name"], arguments=text))


@dataclass
class ToolCallStream:
    """Splits a streamed answer into content deltas and whole tool calls: text streams as content until a
    call may be starting; from there it is held back, and each call is sent once it is complete."""

    fmt: ToolFormat
    text: str = ""
    sent_content: int = 0
    calls: list[ToolCall] = field(default_factory=list)  # the calls sent so far

    def add(self, delta: str, finished: bool) -> tuple[str, list[tuple[int, ToolCall]]]:
        """(content to send now, [(index, call)] complete and not yet sent)."""
        self.text += delta
        start = _call_start(self.text, self.fmt)
        if start is None:
            safe = len(self.text) if finished else self._safe_end()
            content = self.text[self.sent_content : safe]
            self.sent_content = max(self.sent_content, safe)
            return content, []
        content = self.text[self.sent_content : start]
        self.sent_content = max(self.sent_content, start)
        closed = self._closed_calls()
        if not finished and closed <= len(self.calls):
            return content, []  # no call has ended since the last delta: nothing to decode yet
        decoded = _decode_calls(self.text[start:], self.fmt)
        complete = decoded if finished else decoded[:closed]
        new = list(enumerate(complete))[len(self.calls) :]
        self.calls.extend(c for _, c in new)
        if finished and not decoded and self.sent_content < len(self.text):  # it was not a call after all
            content += self.text[self.sent_content :]
            self.sent_content = len(self.text)
        return content, new

    def _closed_calls(self) -> int:
        """Calls whose end marker has been written (formats without one end with the answer)."""
        end = self.fmt.end.strip()
        return self.text.count(end) if end else 0

    def _safe_end(self) -> int:
        """How much text can be sent: all but a tail that could be the start of a call marker."""
        marker = self.fmt.begin.strip() or "{"
        for keep in range(min(len(marker), len(self.text)), 0, -1):
            if marker.startswith(self.text[-keep:]):
                return len(self.text) - keep
        return len(self.text)
