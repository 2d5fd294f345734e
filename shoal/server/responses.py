"""OpenAI's Responses API on the chat route: a Responses request becomes one chat request (instructions, input
items, function tools, tool_choice, text.format), its answer becomes output items (message, function_call),
streamed as the Responses event sequence. Stored responses (store, previous_response_id, GET and DELETE
/v1/responses/{id}) live in the data dir's SQLite when the server has one, else in memory."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag

from shoal.errors import InvalidRequestError, ShoalError
from shoal.server.batch_store import BatchStore
from shoal.server.protocol import (
    TOOL_CHOICE_NEEDS_TOOLS,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Int,
    TextPart,
    _Body,
    bounded,
    needs_when,
    random_id,
)
from shoal.server.serving import OpenAIServing, parse_body

MessageDict = dict[str, Any]


class ResponseNotFoundError(InvalidRequestError):
    """No stored response has this id (404)."""


class FunctionTool(_Body):
    type: str = Field("function", json_schema_extra={"enum": ["function"]})  # others refused by name
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    model_config = ConfigDict(
        json_schema_extra=needs_when("type", {"const": "json_schema"}, "schema", {"type": "object"})
    )
    type: Literal["text", "json_schema", "json_object"] = "text"
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class InputText(_Body):
    type: TextPart = "input_text"
    text: str


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText] | None = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str | None = None
    id: str | None = None
    name: str
    arguments: str = "{}"


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]


class ReasoningItem(_Body):
    type: Literal["reasoning"]


def _item_kind(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    return kind if isinstance(kind, str) else ""


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]


def _something_to_answer(schema: dict[str, Any]) -> None:
    """Input items: at least one that is not reasoning (reasoning items are not sent to the model)."""
    items = next(branch for branch in schema["anyOf"] if branch.get("type") == "array")
    items["contains"] = {"not": {"required": ["type"], "properties": {"type": {"const": "reasoning"}}}}


class ResponsesRequest(_Body):
    model_config = ConfigDict(json_schema_extra=TOOL_CHOICE_NEEDS_TOOLS)
    model: str | None = None
    input: str | list[InputItem] = Field(json_schema_extra=_something_to_answer)
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: Int | None = bounded("max_tokens", limit="max_chat_tokens")
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    seed: Int | None = bounded("seed")  # an extension, as on the chat route
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None


@dataclass
class ResponseStore:
    """Stored responses: in the data dir's database when there is one, else in this process's memory."""

    db: BatchStore | None = None
    memory: dict[str, tuple[str, str]] = field(default_factory=dict)

    def put(self, response: dict[str, Any], conversation: list[MessageDict]) -> None:
        data, conv = json.dumps(response), json.dumps(conversation)
        if self.db is not None:
            self.db.put_response(response["id"], data, conv)
        else:
            self.memory[response["id"]] = (data, conv)

    def get(self, response_id: str) -> tuple[dict[str, Any], list[MessageDict]]:
        row = self.db.get_response(response_id) if self.db is not None else self.memory.get(response_id)
        if row is None:
            raise ResponseNotFoundError(f"no stored response has the id {response_id!r}")
        return json.loads(row[0]), json.loads(row[1])

    def delete(self, response_id: str) -> None:
        found = (
            self.db.delete_response(response_id)
            if self.db is not None
            else self.memory.pop(response_id, None) is not None
        )
        if not found:
            raise ResponseNotFoundError(f"no stored response has the id {response_id!r}")


# ---------------------------------------------------------------- request -> chat request


def input_messages(items: str | list[InputItem]) -> list[MessageDict]:
    """Responses input (text, or message / function_call / function_call_output items) as chat messages;
    reasoning items are dropped (the model's earlier thinking is not sent back to it)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[MessageDict] = []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id or item.id or random_id("call_"),
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return messages


def _text(content: str | list[InputText] | None) -> str:
    if isinstance(content, list):
        return "".join(part.text for part in content)
    return content or ""


def chat_body(request: ResponsesRequest, history: list[MessageDict]) -> dict[str, Any]:
    """The chat request that answers a Responses request whose conversation is `history`."""
    messages = (
        [{"role": "system", "content": request.instructions}] if request.instructions else []
    ) + history
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "parallel_tool_calls": request.parallel_tool_calls,
    }
    if request.tools:
        others = sorted({t.type for t in request.tools if t.type != "function"})
        if others:
            raise InvalidRequestError(f"only function tools are supported, got tools of type {others}")
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in request.tools
        ]
    choice = request.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise InvalidRequestError("text.format json_schema needs a schema")
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return {k: v for k, v in body.items() if v is not None}


# ---------------------------------------------------------------- chat answer -> response


@dataclass
class ResponseBuilder:
    """The response object of one request, as its output arrives (whole, or chunk by chunk)."""

    request: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: random_id("resp_"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    content: str = ""
    reasoning: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # chat tool calls
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    message_id: str = field(default_factory=lambda: random_id("msg_"))

    def take(self, chat: ChatCompletionResponse) -> None:
        choice = chat.choices[0]
        self.content = choice.message.content or ""
        self.reasoning = choice.message.reasoning_content or ""
        self.calls = [c.model_dump() for c in choice.message.tool_calls or []]
        self.finish_reason = choice.finish_reason
        self.set_usage(chat.usage)

    def set_usage(self, usage: Any) -> None:
        if usage is not None:
            self.usage = {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
            }

    def message_item(self, status: str = "completed") -> dict[str, Any]:
        part = {"type": "output_text", "text": self.content, "annotations": []}
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [part] if status == "completed" else [],
        }

    @staticmethod
    def call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": "fc_" + call["id"],
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if status == "completed" else "",
            "status": status,
        }

    def reasoning_item(self) -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": self.reasoning}]
        return {"type": "reasoning", "id": "rs_" + self.id, "summary": [], "content": content}

    def output(self) -> list[dict[str, Any]]:
        items = [self.reasoning_item()] if self.reasoning else []
        if self.content or not self.calls:
            items.append(self.message_item())
        return items + [self.call_item(c) for c in self.calls]

    def response(self, status: str | None = None) -> dict[str, Any]:
        r = self.request
        if status is None:
            status = "incomplete" if self.finish_reason == "length" else "completed"
        choice = r.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": self.output() if status != "in_progress" else [],
            "instructions": r.instructions,
            "parallel_tool_calls": r.parallel_tool_calls,
            "tool_choice": choice.model_dump()
            if isinstance(choice, NamedFunctionChoice)
            else choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in r.tools or []],
            "temperature": r.temperature,
            "top_p": r.top_p,
            "max_output_tokens": r.max_output_tokens,
            "previous_response_id": r.previous_response_id,
            "text": {"format": r.text.format.model_dump(by_alias=True, exclude_none=True)}
            if r.text and r.text.format
            else {"format": {"type": "text"}},
            "metadata": r.metadata or {},
            "store": r.store,
            "usage": self.usage if status != "in_progress" else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": None,
        }

    def assistant_message(self) -> MessageDict:
        return {"role": "assistant", "content": self.content or None, "tool_calls": self.calls or None}


@dataclass
class ResponsesService:
    serving: OpenAIServing
    store: ResponseStore

    async def prepare(self, body: Any) -> tuple[ResponsesRequest, list[MessageDict], Any]:
        """(the request, its conversation without instructions, the prepared chat request)."""
        request = parse_body(ResponsesRequest, body)
        history = []
        if request.previous_response_id:
            _, history = self.store.get(request.previous_response_id)
        history = history + input_messages(request.input)
        chat = parse_body(ChatCompletionRequest, chat_body(request, history))
        return request, history, await self.serving.prepare(chat)

    async def create(self, body: Any) -> dict[str, Any]:
        request, history, prepared = await self.prepare(body)
        builder = ResponseBuilder(request, self.serving.model_name)
        builder.take(await self.serving.complete(prepared, builder.id, priority=0))
        return self._finish(builder, history)

    def _finish(self, builder: ResponseBuilder, history: list[MessageDict]) -> dict[str, Any]:
        response = builder.response()
        if builder.request.store:
            self.store.put(response, [*history, builder.assistant_message()])
        return response

    async def stream(
        self, request: ResponsesRequest, history: list[MessageDict], prepared: Any
    ) -> AsyncIterator[str]:
        """The Responses event sequence as server-sent events."""
        builder = ResponseBuilder(request, self.serving.model_name)
        events = _Events()
        yield events.send("response.created", response=builder.response("in_progress"))
        yield events.send("response.in_progress", response=builder.response("in_progress"))
        message_open = False
        index = 0  # the output index of the next item
        chunks = self.serving.chunks(prepared, builder.id, priority=0)
        try:
            async with aclosing(chunks) as stream:
                async for chunk in stream:
                    assert isinstance(chunk, ChatCompletionChunk)
                    builder.set_usage(chunk.usage)
                    for choice in chunk.choices:
                        delta = choice.delta
                        builder.reasoning += delta.reasoning_content or ""
                        if delta.content:
                            if not message_open:
                                message_open = True
                                yield events.send(
                                    "response.output_item.added",
                                    output_index=index,
                                    item=builder.message_item("in_progress"),
                                )
                                part = {"type": "output_text", "text": "", "annotations": []}
                                yield events.send(
                                    "response.content_part.added", item_id=builder.message_id, output_index=index,
                                    content_index=0, part=part,
                                )  # fmt: skip
                            builder.content += delta.content
                            yield events.send(
                                "response.output_text.delta", item_id=builder.message_id, output_index=index,
                                content_index=0, delta=delta.content, logprobs=[],
                            )  # fmt: skip
                        for call in delta.tool_calls or []:
                            if message_open:
                                for event in self._close_message(events, builder, index):
                                    yield event
                                message_open, index = False, index + 1
                            whole = {
                                "id": call.id,
                                "type": "function",
                                "function": call.function.model_dump(),
                            }
                            builder.calls.append(whole)
                            for event in self._call_events(events, builder, whole, index):
                                yield event
                            index += 1
                        if choice.finish_reason:
                            builder.finish_reason = choice.finish_reason
        except ShoalError as e:  # the request failed after its first event: OpenAI's last event says so
            failed = builder.response("failed")
            code = "invalid_request" if isinstance(e, InvalidRequestError) else "server_error"
            failed["error"] = {"code": code, "message": str(e)}
            yield events.send("response.failed", response=failed)
            return
        if message_open:
            for event in self._close_message(events, builder, index):
                yield event
        response = self._finish(builder, history)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield events.send(kind, response=response)

    @staticmethod
    def _close_message(events: _Events, builder: ResponseBuilder, index: int) -> list[str]:
        part = {"type": "output_text", "text": builder.content, "annotations": []}
        mid = builder.message_id
        return [
            events.send(
                "response.output_text.done",
                item_id=mid,
                output_index=index,
                content_index=0,
                text=builder.content,
                logprobs=[],
            ),  # fmt: skip
            events.send(
                "response.content_part.done", item_id=mid, output_index=index, content_index=0, part=part
            ),
            events.send("response.output_item.done", output_index=index, item=builder.message_item()),
        ]

    @staticmethod
    def _call_events(
        events: _Events, builder: ResponseBuilder, call: dict[str, Any], index: int
    ) -> list[str]:
        item = builder.call_item(call)
        arguments = item["arguments"]
        return [
            events.send(
                "response.output_item.added", output_index=index, item=builder.call_item(call, "in_progress")
            ),
            events.send(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=arguments,
            ),
            events.send(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=arguments,
            ),
            events.send("response.output_item.done", output_index=index, item=item),
        ]


@dataclass
class _Events:
    sequence: int = 0

    def send(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"
