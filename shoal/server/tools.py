"""Tool calling: which call format a model writes (from its chat template and its tokenizer's special tokens),
how the tools reach the prompt, the grammar that constrains calls, and parsing the output back into OpenAI
tool calls, whole or streamed.

Formats: Hermes / Qwen2.5 / Qwen3 (`<tool_call>\\n{"name", "arguments"}\\n</tool_call>`), Llama 3.1+ (a JSON
`{"name", "parameters"}` object, after `<|python_tag|>` or bare; a call may end with `<|eom_id|>`) and
Mistral (`[TOOL_CALLS] [{"name", "arguments"}, ...]`). A marker that the tokenizer holds as one added token
is that token, in the grammar (`<[id]>`) and in parsing (which reads the output's token ids, so
skip_special_tokens cannot hide it); otherwise it is text. A template that does not render tools gets them in
a system message, with the Hermes format asked for in text (the generic fallback).
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass, field
from typing import Any

from shoal.engine.structured_output import JSON_STYLE, strict_schema
from shoal.server.protocol import FunctionCall, NamedToolChoice, Tool, ToolCall, random_id


@dataclass(frozen=True)
class ToolFormat:
    name: str
    begin: str  # what opens the calls (Hermes: each call)
    end: str  # what closes a call ("" for none)
    arguments_key: str  # "arguments" or "parameters"
    separator: str  # between parallel calls
    pad: str = ""  # between a call's markers and its JSON (Hermes: a newline)
    array: bool = False  # Mistral: the calls are one JSON array after the marker
    bare: bool = False  # Llama 3: a call may also be a JSON object with no marker before it
    id_length: int | None = None  # Mistral's templates want call ids of exactly 9 characters
    stops: tuple[str, ...] = ()  # tokens that end a turn of calls (Llama 3's end of message)


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", "\n", pad="\n")
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", "", "parameters", "; ", bare=True, stops=("<|eom_id|>",))
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", ", ", array=True, id_length=9)
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL)}

FALLBACK_PROMPT = """You can call these tools (JSON schemas of their parameters):
{tools}

To call a tool, answer with one line per call, and nothing else:
<tool_call>
{{"name": "<tool name>", "arguments": {{<its arguments as JSON>}}}}
</tool_call>
Results come back in messages of role "tool". Answer normally when no tool is needed."""


def template_format(template: str | None) -> tuple[ToolFormat, bool]:
    """(the call format, whether the template renders tools itself), read from the template's text."""
    text = template or ""
    renders_tools = "tools" in text
    if "[TOOL_CALLS]" in text:
        return MISTRAL, renders_tools
    if "<tool_call>" in text:
        return HERMES, renders_tools
    if "<|python_tag|>" in text or ("<|start_header_id|>" in text and renders_tools):
        return LLAMA3, renders_tools
    return HERMES, renders_tools


@dataclass(frozen=True)
class ToolSyntax:
    """A format as one model's tokenizer holds it: its markers' token ids where they are single added tokens."""

    format: ToolFormat
    renders_tools: bool
    begin_id: int | None = None
    end_id: int | None = None
    stop_ids: tuple[int, ...] = ()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ToolSyntax:
        fmt, renders = template_format(getattr(tokenizer, "chat_template", None))
        added = tokenizer.get_added_vocab()
        if not renders:  # the fallback writes its markers in text
            return cls(fmt, False)
        stops = tuple(added[s] for s in fmt.stops if s in added)
        return cls(fmt, True, added.get(fmt.begin), added.get(fmt.end) if fmt.end else None, stops)

    @property
    def markers(self) -> dict[int, str]:
        pairs = ((self.begin_id, self.format.begin), (self.end_id, self.format.end))
        return {i: text for i, text in pairs if i is not None}

    def begin_rule(self) -> str:
        return f"<[{self.begin_id}]>" if self.begin_id is not None else json.dumps(self.format.begin)

    def end_rule(self) -> str:
        return f"<[{self.end_id}]>" if self.end_id is not None else json.dumps(self.format.end)


@dataclass
class ToolPlan:
    """What one chat request's tools mean for its prompt, its constraint and its answer."""

    tools: list[Tool]
    choice: str | NamedToolChoice  # "auto" | "required" | a named function
    parallel: bool
    syntax: ToolSyntax

    @property
    def format(self) -> ToolFormat:
        return self.syntax.format

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    @property
    def many(self) -> bool:
        """Whether more than one call may be made: never for a named function (OpenAI makes exactly one)."""
        return self.parallel and not isinstance(self.choice, NamedToolChoice)

    @property
    def offered(self) -> list[Tool]:
        if isinstance(self.choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.choice.function.name]
        return self.tools

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.syntax.renders_tools else None

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the template should see it (see conversation_for_template); without tool
        support in the template, the tools described in a system message."""
        converted = conversation_for_template(messages, self.syntax)
        if self.syntax.renders_tools:
            return converted
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in self.offered)
        system = FALLBACK_PROMPT.format(tools=described)
        if converted and converted[0]["role"] in ("system", "developer"):
            first = converted[0]
            return [{"role": first["role"], "content": f"{first['content']}\n\n{system}"}, *converted[1:]]
        return [{"role": "system", "content": system}, *converted]

    def call_schema(self) -> dict[str, Any]:
        """A JSON schema that exactly the allowed calls match (the name, then schema-valid arguments; strict
        unless the tool says strict: false)."""
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    self.format.arguments_key: _parameters(t),
                },
                "required": ["name", self.format.arguments_key],
                "additionalProperties": False,
            }
            for t in self.offered
        ]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {**schema, "x-guidance": JSON_STYLE}

    def grammar(self, answer_schema: dict[str, Any] | None = None) -> str:
        """A Lark grammar (llguidance's). Forced: calls from the first token. auto: free text, or calls once
        the model opens one (only well-formed calls from there). With answer_schema (tools together with
        response_format): either calls or an answer in that schema."""
        fmt, syn = self.format, self.syntax
        lines = [f"call_json: %json {json.dumps(self.call_schema())}", *self._call_rules()]
        optional_begin = f"{syn.begin_rule()}? " if fmt.bare else ""
        if self.forced:
            lines.insert(0, f"start: {optional_begin}calls")
        elif answer_schema is not None:
            answer = {**answer_schema, "x-guidance": JSON_STYLE}
            opener = syn.begin_rule() + " " if fmt.bare else ""
            lines[:0] = [f"start: answer | {opener}calls", f"answer: %json {json.dumps(answer)}"]
        elif fmt.bare:  # text that does not start with '{', or calls (after <|python_tag|> or bare)
            lines[:0] = [f"start: TEXT | {optional_begin}calls", "TEXT: /[^{](.|\\n)*/"]
        elif syn.begin_id is not None:  # the marker is a token that free text cannot contain
            lines[:0] = ["start: TEXT calls?", "TEXT: /(.|\\n)*/"]
        else:  # a text marker: free text until it has been written, then the calls
            lines[:0] = [
                "start: TEXT | opened",
                f"opened: trigger {self._after_begin()}",
                f"trigger[lazy]: TEXT {json.dumps(fmt.begin)}",
                "TEXT: /(.|\\n)*/",
            ]
        return "\n".join(lines)

    def _call_rules(self) -> list[str]:
        fmt, syn = self.format, self.syntax
        if fmt.bare:
            more = f" ({json.dumps(fmt.separator)} call_json)*" if self.many else ""
            return [f"calls: call_json{more}"]
        rules = [f"calls: {syn.begin_rule()} {self._after_begin()}"]
        if not fmt.array:
            rules.append(f"call: {syn.begin_rule()} {self._one_call()}")
        return rules

    def _one_call(self) -> str:
        """A Hermes-style call after its opening marker: the JSON between pads, then the closing marker."""
        pad = json.dumps(self.format.pad) if self.format.pad else ""
        return f"{pad} call_json {pad} {self.syntax.end_rule()}".strip()

    def _after_begin(self) -> str:
        """What follows the marker that opens the calls: the calls (one, or more when allowed)."""
        sep = json.dumps(self.format.separator)
        if self.format.array:
            more = f" ({sep} call_json)*" if self.many else ""
            return f'" "? "[" call_json{more} "]"'
        more = f" ({sep} call)*" if self.many else ""
        return self._one_call() + more


def _parameters(tool: Tool) -> dict[str, Any]:
    schema = tool.function.parameters or {"type": "object", "properties": {}}
    return schema if tool.function.strict is False else strict_schema(schema)


def conversation_for_template(messages: list[dict[str, Any]], syntax: ToolSyntax) -> list[dict[str, Any]]:
    """Messages as the template takes them: tool calls' arguments as objects, call ids as the format wants
    them; for a template without tools, calls and results written as text in the fallback format."""
    short = syntax.format.id_length
    converted = []
    for message in messages:
        message = _arguments_as_objects(message, short)
        if short and message.get("role") == "tool" and message.get("tool_call_id"):
            message = {**message, "tool_call_id": _short_id(message["tool_call_id"], short)}
        if not syntax.renders_tools:
            message = _as_text(message, syntax.format)
        converted.append(message)
    return converted


def _short_id(call_id: str, length: int) -> str:
    """A call id of `length` letters and digits, the same for the same id (Mistral's template insists)."""
    if len(call_id) == length and call_id.isalnum():
        return call_id
    alphabet = string.ascii_letters + string.digits
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:length])


def _arguments_as_objects(message: dict[str, Any], short_ids: int | None) -> dict[str, Any]:
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
        call = {**call, "function": function}
        if short_ids and call.get("id"):
            call["id"] = _short_id(call["id"], short_ids)
        converted.append(call)
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
        f"{fmt.begin}{fmt.pad}"
        f"{json.dumps({'name': c['function']['name'], fmt.arguments_key: _arguments(c)})}"
        f"{fmt.pad}{fmt.end}"
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


@dataclass(frozen=True)
class ToolParser:
    """Reads calls out of an answer's token ids: marker tokens are found as ids, the text around them decoded
    without special tokens."""

    syntax: ToolSyntax
    tokenizer: Any

    @property
    def format(self) -> ToolFormat:
        return self.syntax.format

    def text(self, ids: list[int]) -> str:
        """The answer as text, markers written as their text wherever they are tokens, other special tokens
        (the end of turn) left out."""
        markers = self.syntax.markers
        parts, run = [], []
        for token in ids:
            if token in markers:
                parts += [self.decode(run), markers[token]]
                run = []
            else:
                run.append(token)
        parts.append(self.decode(run))
        return "".join(parts)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def parse(self, ids: list[int]) -> tuple[str | None, list[ToolCall]]:
        """(the content before the calls, or None; the calls) of a whole answer. Text that is not a call in
        the format stays content."""
        text = self.text(ids)
        start = _call_start(text, self.format)
        if start is None:
            return text, []
        calls = self.decode_calls(text[start:])
        if not calls:
            return text, []
        content = text[:start].strip()
        return content or None, calls

    def decode_calls(self, text: str) -> list[ToolCall]:
        fmt = self.format
        values = _json_values(text, fmt)
        if fmt.array:
            values = [v for value in values if isinstance(value, list) for v in value]
        return [c for c in (_as_call(v, fmt) for v in values) if c is not None]


def _call_start(text: str, fmt: ToolFormat) -> int | None:
    index = text.find(fmt.begin)
    if index >= 0:
        return index
    if fmt.bare:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else None
    return None


def _json_values(text: str, fmt: ToolFormat) -> list[Any]:
    """The JSON values written in the calls' text, in order: after each marker, or separated."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    rest = text
    while True:
        rest = rest.lstrip()
        if rest.startswith(fmt.separator.strip() or "\0"):
            rest = rest[len(fmt.separator.strip()) :].lstrip()
        if rest.startswith(fmt.begin):
            rest = rest[len(fmt.begin) :].lstrip()
        elif not fmt.bare and not values and not fmt.array:
            break
        try:
            value, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        values.append(value)
        rest = rest[end:].lstrip()
        if fmt.end and rest.startswith(fmt.end):
            rest = rest[len(fmt.end) :]
        if not rest.strip():
            break
    return values


def _as_call(value: Any, fmt: ToolFormat) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(fmt.arguments_key, value.get("arguments", value.get("parameters", {})))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    call_id = _random_alnum(fmt.id_length) if fmt.id_length else random_id("call_")
    return ToolCall(id=call_id, function=FunctionCall(name=value["name"], arguments=text))


def _random_alnum(length: int) -> str:
    return random_id("")[:length]


@dataclass
class ToolCallStream:
    """Splits a streamed answer into content deltas and whole tool calls: text streams as content until a
    call may be starting; from there it is held back, and each call is sent once it is complete."""

    parser: ToolParser
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the engine's text deltas joined (not read past a marker token)
    sent_content: int = 0  # characters of content sent
    token_start: int | None = None  # the calls began at this index of ids (a marker token) ...
    text_start: int | None = None  # ... or at this index of text (a marker in text, or a bare '{')
    calls: list[ToolCall] = field(default_factory=list)  # the calls sent so far

    @property
    def format(self) -> ToolFormat:
        return self.parser.format

    @property
    def started(self) -> bool:
        return self.token_start is not None or self.text_start is not None

    def add(self, delta: str, delta_ids: list[int], finished: bool) -> tuple[str, list[tuple[int, ToolCall]]]:
        """(content to send now, [(index, call)] complete and not yet sent)."""
        self.ids += delta_ids
        if self.started:
            content = ""
            if self.text_start is not None:
                self.text += delta
        else:
            content = self._content(delta, delta_ids, finished)
            if not self.started:
                return content, []
        closed = self._closed_calls()
        if not finished and closed <= len(self.calls):
            return content, []  # no call has ended since the last delta: nothing to decode yet
        text = self._calls_text()
        decoded = self.parser.decode_calls(text)
        complete = decoded if finished else decoded[:closed]
        new = list(enumerate(complete))[len(self.calls) :]
        self.calls.extend(c for _, c in new)
        if finished and not decoded:  # it was not a call after all
            content += text
        return content, new

    def _content(self, delta: str, delta_ids: list[int], finished: bool) -> str:
        """The content to send before any call; notes where the calls begin once they do."""
        begin = self.parser.syntax.begin_id
        if begin is not None and begin in delta_ids:
            self.token_start = self.ids.index(begin)
            before = self.parser.decode(self.ids[: self.token_start])
            content, self.sent_content = before[self.sent_content :], len(before)
            return content
        self.text += delta
        start = _call_start(self.text, self.format)
        if start is not None:
            self.text_start = start
        end = start if start is not None else len(self.text) if finished else self._safe_end()
        content = self.text[self.sent_content : end]
        self.sent_content = max(self.sent_content, end)
        return content

    def _calls_text(self) -> str:
        if self.token_start is not None:
            return self.parser.text(self.ids[self.token_start :])
        return self.text[self.text_start or 0 :]

    def _closed_calls(self) -> int:
        """Calls whose end marker has been written (formats without one end with the answer)."""
        end_id = self.parser.syntax.end_id
        if end_id is not None and self.token_start is not None:
            return self.ids.count(end_id)
        end = self.format.end
        return self._calls_text().count(end) if end else 0

    def _safe_end(self) -> int:
        """How much text can be sent: all but a tail that could be the start of a call marker."""
        marker = self.format.begin
        hold = 0
        for keep in range(min(len(marker), len(self.text)), 0, -1):
            if marker.startswith(self.text[-keep:]):
                hold = keep
                break
        if self.format.bare and not self.text[: len(self.text) - hold].strip():
            return 0  # only whitespace so far: a bare JSON call may still begin
        return len(self.text) - hold
