"""The OpenAPI document of the server, from the real request and response models: the routes read their
bodies themselves (to bound and time them), so FastAPI cannot see them; this adds each route's request body
and the error responses it sends, and drops FastAPI's 422, which the server never sends (its bad input is a
400)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from shoal.server.protocol import (
    LIMIT,
    BatchCreateRequest,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)
from shoal.server.responses import ResponsesRequest

REQUEST_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/v1/completions"): CompletionRequest,
    ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/responses"): ResponsesRequest,
    ("post", "/tokenize"): TokenizeRequest,
    ("post", "/detokenize"): DetokenizeRequest,
    ("post", "/v1/batches"): BatchCreateRequest,
}
# 200 answers whose routes return a Response the document cannot infer; streams are server-sent events
ANSWERS: dict[tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel] | None]] = {
    ("post", "/v1/completions"): (CompletionResponse, CompletionResponse),
    ("post", "/v1/chat/completions"): (ChatCompletionResponse, ChatCompletionChunk),
    ("post", "/v1/responses"): (None, None),
}
SSE_EVENT = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
PLAIN_ANSWERS = {
    ("get", "/metrics"): "text/plain",
    ("get", "/v1/files/{file_id}/content"): "application/jsonl",
}
UPLOAD = {
    "schema": {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "purpose": {"type": "string", "enum": ["batch"]},
        },
        "required": ["file", "purpose"],
    }
}
# The objects a POST creates, for clients and tools that follow them (OpenAPI links): target, its parameter.
LINKS = {
    ("post", "/v1/files"): [
        ("get", "/v1/files/{file_id}", "file_id"),
        ("get", "/v1/files/{file_id}/content", "file_id"),
        ("delete", "/v1/files/{file_id}", "file_id"),
    ],
    ("post", "/v1/batches"): [
        ("get", "/v1/batches/{batch_id}", "batch_id"),
        ("post", "/v1/batches/{batch_id}/cancel", "batch_id"),
    ],
    ("post", "/v1/responses"): [
        ("get", "/v1/responses/{response_id}", "response_id"),
        ("delete", "/v1/responses/{response_id}", "response_id"),
    ],
}
ERRORS = {
    "400": "bad input: the message says what to change",
    "401": "a missing or wrong API key (when the server has one)",
    "404": "no such object",
    "413": "the request body is over --max-request-bytes",
    "431": "the request headers are over --max-header-bytes",
    "503": "at capacity (retry after Retry-After seconds) or shutting down",
}


@dataclass(frozen=True)
class Limits:
    """What only the running server knows: its vocabulary, context, largest n, and its shortest prompts
    (so the largest max_tokens a request can have is the context less one of those)."""

    vocab_size: int
    max_model_len: int
    max_n: int
    shortest_prompt: int  # tokens of a one-character prompt
    shortest_chat: int  # tokens of one empty user message, rendered

    def keywords(self, limit: str) -> dict[str, Any]:
        return {
            "token_id": {"maximum": self.vocab_size - 1},
            "token_id_text": {"pattern": below_pattern(self.vocab_size)},
            "max_model_len": {"maxItems": self.max_model_len},
            "max_tokens": {"maximum": self.max_model_len - self.shortest_prompt},
            "max_chat_tokens": {"maximum": self.max_model_len - self.shortest_chat},
            "n": {"maximum": self.max_n},
        }[limit]


def install(app: FastAPI, limits: Limits | None) -> None:
    """Replace the app's generated document with the complete one (built once, on first request)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, limits)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def below_pattern(n: int) -> str:
    """A regular expression for the decimal numbers in [0, n), leading zeros allowed (as the server reads
    them): shorter numbers, then those of n - 1's length digit by digit."""
    top = str(n - 1)
    options = [f"[0-9]{{1,{len(top) - 1}}}"] if len(top) > 1 else []
    for i, digit in enumerate(top):
        if digit != "0":
            rest = len(top) - i - 1
            options.append(top[:i] + f"[0-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    options.append(top)
    return f"^0*({'|'.join(options)})$"


def _resolve_limits(node: Any, limits: Limits | None) -> None:
    """Each x-shoal-limit keyword replaced by the limit's own keywords (dropped where they are unknown)."""
    if isinstance(node, dict):
        limit = node.pop(LIMIT, None)
        if limit is not None and limits is not None:
            node.update(limits.keywords(limit))
        for value in node.values():
            _resolve_limits(value, limits)
    elif isinstance(node, list):
        for value in node:
            _resolve_limits(value, limits)


def build(app: FastAPI, limits: Limits | None = None) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["ErrorResponse"] = _schema(ErrorResponse, components)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            model = REQUEST_BODIES.get((method, path))
            if (method, path) == ("post", "/v1/files"):
                operation["requestBody"] = {"required": True, "content": {"multipart/form-data": UPLOAD}}
            if model is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _schema(model, components)}},
                }
            if (method, path) in ANSWERS:
                whole, chunk = ANSWERS[(method, path)]
                ok = {
                    "application/json": {
                        "schema": _schema(whole, components) if whole else {"type": "object"}
                    }
                }
                ok["text/event-stream"] = {"schema": {**SSE_EVENT, "description": _stream(chunk)}}
                operation["responses"]["200"] = {"description": "the answer, or its stream", "content": ok}
            responses = operation.setdefault("responses", {})
            if (method, path) in PLAIN_ANSWERS:
                responses["200"] = {
                    "description": "OK",
                    "content": {PLAIN_ANSWERS[(method, path)]: {"schema": {"type": "string"}}},
                }
            responses.pop("422", None)
            for code in _errors(method, path):
                responses[code] = {
                    "description": ERRORS[code],
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    },
                }
    _add_links(doc)
    _resolve_limits(doc, limits)
    return doc


def _add_links(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    for (method, path), targets in LINKS.items():
        if path not in paths:
            continue  # an app without the Batch API
        links = paths[path][method]["responses"]["200"].setdefault("links", {})
        for target_method, target, parameter in targets:
            operation_id = paths[target][target_method]["operationId"]
            links[operation_id] = {
                "operationId": operation_id,
                "parameters": {parameter: "$response.body#/id"},
            }


def _errors(method: str, path: str) -> list[str]:
    if path in ("/health", "/metrics"):
        return ["503"] if path == "/health" else []
    codes = ["400", "401", "404", "413", "431"]  # 404: an unknown model, file, batch or response
    if method == "post" and path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        codes.append("503")
    return sorted(codes)


def _stream(chunk: type[BaseModel] | None) -> str:
    if chunk is None:
        return "Responses API events: `event: <type>` and `data: <event JSON>` lines"
    return f"`data: <{chunk.__name__} JSON>` lines, then `data: [DONE]` (with stream: true)"


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """A reference to the model's schema, which (and whatever it refers to) goes into the components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(model.__name__, schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}
