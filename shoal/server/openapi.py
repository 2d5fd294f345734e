"""The OpenAPI document of the server, from the real request and response models: the routes read their
bodies themselves (to bound and time them), so FastAPI cannot see them; this adds each route's request body
and the error responses it sends, and drops FastAPI's 422, which the server never sends (its bad input is a
400)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from shoal.server.protocol import (
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
ERRORS = {
    "400": "bad input: the message says what to change",
    "401": "a missing or wrong API key (when the server has one)",
    "404": "no such object",
    "413": "the request body is over --max-request-bytes",
    "431": "the request headers are over --max-header-bytes",
    "503": "at capacity (retry after Retry-After seconds) or shutting down",
}


def install(app: FastAPI) -> None:
    """Replace the app's generated document with the complete one (built once, on first request)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def build(app: FastAPI) -> dict[str, Any]:
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
    return doc


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
