"""OpenAI wire shapes: request bodies the server accepts and the objects it answers with."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from shoal.sampling_params import BOUNDS, Bound

# A schema keyword naming a limit that only the running server knows (vocabulary, context, n);
# the OpenAPI document replaces it with the limit's value.
LIMIT = "x-shoal-limit"


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Body(BaseModel):
    # Clients send fields we do not use (user, service_tier, ...): ignore them rather than fail. Values are
    # taken as the document types them: "1" is not a number, 0 is not false.
    model_config = ConfigDict(extra="ignore", strict=True)


def needs_when(field: str, value: Any, needed: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema rule: when `field` is `value`, `needed` must be given as `schema`."""
    return {
        "if": {"required": [field], "properties": {field: value}},
        "then": {"required": [needed], "properties": {needed: schema}},
    }


TOOL_CHOICE_NEEDS_TOOLS = needs_when(
    "tool_choice",
    {"anyOf": [{"const": "required"}, {"const": "auto"}, {"type": "object"}]},
    "tools",
    {"type": "array", "minItems": 1},
)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON has it: 3 or 3.0 (strict models take no other float, nor "3", for an int).
Int = Annotated[int, BeforeValidator(_integral)]


def _numbers_in(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The integer and number schemas in a field's schema (its anyOf branches, array items, ...)."""
    found = [schema] if schema.get("type") in ("integer", "number") else []
    for branch in schema.get("anyOf", []):
        found += _numbers_in(branch)
    if isinstance(schema.get("items"), dict):
        found += _numbers_in(schema["items"])
    return found


def _state_bound(bound: Bound, schema: dict[str, Any]) -> None:
    for number in _numbers_in(schema):
        number.update(bound.json_schema())


def bounded(name: str, default: Any = None, limit: str | None = None) -> Any:
    """A field whose document states the range SamplingParams enforces for `name` (and a server limit)."""

    def extra(schema: dict[str, Any]) -> None:
        _state_bound(BOUNDS[name], schema)
        if limit is not None:
            for number in _numbers_in(schema):
                number[LIMIT] = limit

    return Field(default, json_schema_extra=extra)


def _token_ids(schema: dict[str, Any]) -> None:
    """Every integer in the field is a token id."""
    for number in _numbers_in(schema):
        number.update({"minimum": 0, LIMIT: "token_id"})


def _prompt(schema: dict[str, Any]) -> None:
    """Token ids or text, none of it empty (an empty prompt has nothing to continue)."""
    _token_ids(schema)
    _non_empty(schema, texts=True)


def _token_id_list(schema: dict[str, Any]) -> None:
    """Token ids to decode: any number of them (none too), up to the context."""
    _token_ids(schema)
    schema[LIMIT] = "max_model_len"


def _bias_map(schema: dict[str, Any]) -> None:
    """Token ids (as ASCII digits) to biases."""
    mapping = schema["anyOf"][0]
    _state_bound(BOUNDS["logit_bias"], mapping["additionalProperties"])
    mapping["propertyNames"] = {LIMIT: "token_id_text"}


def non_empty(default: Any = ...) -> Any:
    """A list the server refuses empty (messages)."""
    return Field(default, json_schema_extra=_non_empty)


def _non_empty(schema: dict[str, Any], texts: bool = False) -> None:
    """Every array in the field, nested ones too, non-empty (and with texts, every string)."""
    for branch in [schema, *schema.get("anyOf", [])]:
        if branch.get("type") == "array":
            branch["minItems"] = 1
            if isinstance(branch.get("items"), dict):
                _non_empty(branch["items"], texts)
        if texts and branch.get("type") == "string":
            branch["minLength"] = 1


# ---------------------------------------------------------------- requests


class StreamOptions(_Body):
    include_usage: bool = False


class StructuredOutputs(_Body):
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    model_config = ConfigDict(
        json_schema_extra=needs_when("type", {"const": "json_schema"}, "json_schema", {"type": "object"})
    )
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class _GenerationRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions. None means the default."""

    model: str | None = None
    max_tokens: Int | None = bounded("max_tokens", limit="max_chat_tokens")
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    top_k: Int | None = bounded("top_k")
    min_p: float | None = bounded("min_p")
    n: Int = bounded("n", 1, limit="n")
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = Field(None, json_schema_extra=_token_ids)
    seed: Int | None = bounded("seed")
    presence_penalty: float | None = bounded("presence_penalty")
    frequency_penalty: float | None = bounded("frequency_penalty")
    repetition_penalty: float | None = bounded("repetition_penalty")
    min_tokens: Int = bounded("min_tokens", 0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: Int = bounded("priority", 0)  # extension: lower runs first
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=_bias_map)  # token id -> bias
    prompt_logprobs: Int | None = bounded("prompt_logprobs")  # vLLM's extension: top-N per prompt token
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension
    # vLLM's older names for structured_outputs
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(json_schema_extra=_prompt)
    max_tokens: Int | None = bounded("max_tokens", 16, limit="max_tokens")

    @property
    def num_prompts(self) -> int:
        single = isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int))
        return 1 if single else len(self.prompt)

    logprobs: Int | None = bounded("logprobs")
    echo: bool = False
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})  # not supported
    best_of: Int | None = Field(None, json_schema_extra={"anyOf": [{"const": 1}, {"type": "null"}]})  # only 1


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


TextPart = Literal["text", "input_text", "output_text"]  # the Responses API names its text parts so
TEXT_PARTS = get_args(TextPart)


class ContentPart(BaseModel):
    # Only text parts are served; other kinds are refused by name when the request is prepared.
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(json_schema_extra={"enum": list(TEXT_PARTS)})  # others refused by name
    text: str | None = None


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(BaseModel):
    """A call in an assistant message of the conversation (as the API answered it)."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    # Extra keys (name, ...) are passed through to the chat template.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                needs_when("top_logprobs", {"type": "integer"}, "logprobs", {"const": True}),
                TOOL_CHOICE_NEEDS_TOOLS,
            ]
        }
    )
    # Extension: a list of conversations is decoded as one batch, one choice per conversation.
    messages: list[ChatMessage] | list[list[ChatMessage]] = non_empty()
    max_completion_tokens: Int | None = bounded("max_tokens", limit="max_chat_tokens")
    logprobs: bool = False
    top_logprobs: Int | None = bounded("logprobs")
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = (
        None  # vLLM's: passed to the template (enable_thinking, ...)
    )

    @property
    def num_prompts(self) -> int:
        return len(self.messages) if self.messages and isinstance(self.messages[0], list) else 1


# ---------------------------------------------------------------- responses


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[int, PromptLogprob] | None]  # vLLM's shape: per prompt token, token id -> logprob


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("call_"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # a reasoning model's thinking, apart from its answer
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # of the first conversation


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeRequest(_Body):
    """Exactly one of prompt and messages."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}
    )
    model: str | None = None
    prompt: str = None  # type: ignore[assignment]  # absent is None; null is not a prompt
    messages: list[ChatMessage] = non_empty(None)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Int] = Field(json_schema_extra=_token_id_list)


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "shoal"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- files and batches

BATCH_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FINAL_STATUSES = ("failed", "completed", "expired", "cancelled")


class FileObject(BaseModel):
    id: str = Field(default_factory=lambda: random_id("file-"))
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(default_factory=now)
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreateRequest(_Body):
    input_file_id: str
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    id: str = Field(default_factory=lambda: random_id("batch_"))
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int = Field(default_factory=now)
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
