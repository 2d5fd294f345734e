"""The OpenAI-compatible HTTP server over an engine client: the app, its error handlers, health and metrics, and
the generation routes (completions and chat, two handlers over one `_generate`). The Batch API routes are in
batch_routes.py; what the routes share is in state.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shoal.engine.protocol import EngineClient
from shoal.errors import EngineDeadError, InvalidRequestError
from shoal.server import openapi
from shoal.server.batch_jobs import LineAnswerer, local_answerer
from shoal.server.batch_routes import batch_routes
from shoal.server.batch_store import BatchStore
from shoal.server.batch_worker import BatchWorker
from shoal.server.http import BodyLimit, LimitedH11Protocol, ShoalServer
from shoal.server.metrics import RequestTiming, ServerMetrics
from shoal.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from shoal.server.responses import ResponseNotFoundError, ResponsesService, ResponseStore
from shoal.server.serving import (
    INTERNAL_ERROR,
    OpenAIServing,
    error_body,
    error_status,
    new_request_id,
    parse_body,
    parse_json,
    parse_request,
)
from shoal.server.state import (
    Admission,
    APIError,
    ClientGone,
    ServerConfig,
    ServerState,
    check_api_key,
    get_state,
    refuse_if_draining,
)

T = TypeVar("T")
log = logging.getLogger("shoal.server")


def build_app(
    engine: EngineClient, config: ServerConfig | None = None, store: BatchStore | None = None
) -> FastAPI:
    """The server app. It owns `engine` (and `store`): they are shut down with the app. Without a store, one
    is opened on config.data_dir (taking its lock) when that is set. Serve it with make_server(), which
    starts the Batch API worker once the port is bound."""
    config = config or ServerConfig()
    serving = OpenAIServing(engine, config.model_names, config.max_n)
    if store is None and config.data_dir is not None:
        store = BatchStore(config.data_dir)
    state = _state(config, engine, serving, store, local_answerer(serving), engine.model_name)
    state.responses = ResponsesService(serving, ResponseStore(store))
    app = _app(state)
    app.include_router(_generation_routes(), dependencies=[Depends(check_api_key)])
    return app


def build_batch_app(
    config: ServerConfig, store: BatchStore, answer: LineAnswerer, model_name: str
) -> FastAPI:
    """An app serving only the Batch API, its lines answered by `answer` (replicas elsewhere)."""
    return _app(_state(config, None, None, store, answer, model_name))


def _state(
    config: ServerConfig,
    engine: EngineClient | None,
    serving: OpenAIServing | None,
    store: BatchStore | None,
    answer: LineAnswerer,
    model_name: str,
) -> ServerState:
    admission = Admission(config.max_waiting, config.retry_after_s)
    state = ServerState(engine, config, serving, ServerMetrics(engine), admission, model_name)
    if store is not None:
        state.store = store
        state.worker = BatchWorker(
            store,
            answer,
            config.batch_priority,
            config.batch_concurrency,
            config.batch_checkpoint_s,
            config.max_line_bytes,
        )
    return state


def _app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if state.worker is not None:
                await state.worker.stop()
            if state.store is not None:
                state.store.close()
            if state.engine is not None:
                await state.engine.shutdown()

    app = FastAPI(title="shoal", lifespan=lifespan)
    openapi.install(app, None if state.engine is None else _limits(state.engine, state.config))
    app.state.shoal = state
    app.add_middleware(BodyLimit, max_bytes=state.config.max_request_bytes, exempt=("/v1/files",))
    _add_error_handlers(app)
    app.include_router(_public_routes())
    app.include_router(batch_routes(), dependencies=[Depends(check_api_key)])
    return app


def _limits(engine: EngineClient, config: ServerConfig) -> openapi.Limits:
    shortest_chat = len(engine.render_chat([{"role": "user", "content": ""}]))
    shortest = len(engine.tokenizer.encode("x"))
    return openapi.Limits(len(engine.tokenizer), engine.max_model_len, config.max_n, shortest, shortest_chat)


def make_server(app: FastAPI, host: str, port: int, **uvicorn_options: Any) -> ShoalServer:
    """The uvicorn server for a build_app() app: the header limit of its config, the Batch API worker
    started once the port is bound, and SIGTERM draining."""
    state: ServerState = app.state.shoal
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=LimitedH11Protocol,
        h11_max_incomplete_event_size=state.config.max_header_bytes,
        **uvicorn_options,
    )
    return ShoalServer(config, on_bound=state.start_background, on_exit=state.begin_drain)


# ---------------------------------------------------------------- errors


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        if e.status == 503:
            get_state(request).metrics.rejected.inc()
        return _error(e.status, e.message, e.kind, e.code, e.headers)

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, e: InvalidRequestError) -> JSONResponse:
        if isinstance(e, ResponseNotFoundError):
            return _error(404, str(e), code="not_found")
        status, code = error_status(e)
        return _error(status, str(e), code=code)

    @app.exception_handler(RequestValidationError)
    async def unparsable(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, _fastapi_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:  # every method the path has, not only those of the first route matched
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _error(e.status_code, str(e.detail), headers=headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError) -> JSONResponse:
        return _error(500, f"the engine stopped: {e}", "server_error", "engine_dead")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=e)
        return _error(500, INTERNAL_ERROR, "server_error")


def _allowed_methods(request: Request) -> list[str]:
    return sorted(set(_route_methods(request.app.routes, {**request.scope, "method": "GET"})))


def _route_methods(routes: list[Any], scope: dict[str, Any]) -> list[str]:
    """The methods of the routes whose path matches the scope's (included routers searched too)."""
    methods: list[str] = []
    for route in routes:
        nested = getattr(route, "original_router", None) or route  # FastAPI keeps included routers whole
        if getattr(nested, "routes", None) is not None:
            methods += _route_methods(nested.routes, scope)
        elif getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods += route.methods
    return methods


def _fastapi_message(e: RequestValidationError) -> str:
    parts = [f"'{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in e.errors()]
    return "invalid request: " + "; ".join(parts)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (aborting its engine requests) as soon as the client disconnects."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job = asyncio.ensure_future(work)
    watch = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return job.result()
        raise ClientGone()
    finally:
        watch.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job


# ---------------------------------------------------------------- routes


def _public_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> Response:
        if get_state(request).draining:
            return _error(503, "the server is shutting down", "server_error", "draining")
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    return router


def _generation_routes() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models(request: Request) -> ModelList:
        engine = get_state(request).engine
        return ModelList(data=[ModelCard(id=engine.model_name, max_model_len=engine.max_model_len)])

    @router.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> ModelCard:
        engine = get_state(request).engine
        get_state(request).serving.check_model(model_id)
        return ModelCard(id=model_id, max_model_len=engine.max_model_len)

    @router.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        return await _respond(request)

    @router.get("/v1/responses/{response_id}")
    async def get_response(request: Request, response_id: str) -> JSONResponse:
        return JSONResponse(get_state(request).responses.store.get(response_id)[0])

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> JSONResponse:
        get_state(request).responses.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, "/v1/completions")

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "/v1/chat/completions")

    @router.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        """The tokenizer's configuration in vLLM's shape (what lm-eval's remote tokenizer reads)."""
        return JSONResponse(get_state(request).serving.tokenizer_info())

    @router.post("/tokenize")
    async def tokenize(request: Request) -> TokenizeResponse:
        state = get_state(request)
        async with state.tokenizer_slots:  # the worker threads stay free for generation requests
            body = await asyncio.to_thread(parse_body, TokenizeRequest, parse_json(await request.body()))
            return await asyncio.to_thread(state.serving.tokenize, body)

    @router.post("/detokenize")
    async def detokenize(request: Request) -> DetokenizeResponse:
        state = get_state(request)
        async with state.tokenizer_slots:
            body = await asyncio.to_thread(parse_body, DetokenizeRequest, parse_json(await request.body()))
            return await asyncio.to_thread(state.serving.detokenize, body)

    return router


async def _generate(request: Request, url: str) -> Response:
    state = get_state(request)
    arrival = time.perf_counter()
    try:
        refuse_if_draining(state)
        body = await asyncio.to_thread(parse_request, url, parse_json(await request.body()))
        ticket = state.admission.admit(body.num_prompts, body.n)
    except (APIError, InvalidRequestError) as e:
        state.metrics.requests.labels(url, str(getattr(e, "status", 400))).inc()
        raise
    state.metrics.waiting.set(state.admission.waiting)
    status = 500

    def finish(code: int) -> None:
        ticket.close()
        state.metrics.waiting.set(state.admission.waiting)
        state.metrics.requests.labels(url, str(code)).inc()
        state.metrics.e2e.observe(time.perf_counter() - arrival)

    streaming = False
    try:
        prepared = await state.serving.prepare(body)
        request_id = new_request_id(prepared)
        timing = RequestTiming(state.metrics, arrival, ticket.release_prompt, cumulative=not body.stream)
        if body.stream:
            events = state.serving.stream(prepared, request_id, body.priority, timing)
            first = await _until_disconnect(request, anext(events))
            streaming = True
            return StreamingResponse(_sse(first, events, state, finish), media_type="text/event-stream")
        response = await _until_disconnect(
            request, state.serving.complete(prepared, request_id, body.priority, timing)
        )
        status = 200
        return JSONResponse(response.model_dump())
    except ClientGone:
        state.metrics.aborted.inc()
        status = 499
        return Response(status_code=499)
    except InvalidRequestError as e:
        status = error_status(e)[0]
        raise
    except EngineDeadError:
        raise
    except Exception:  # answered here, not re-raised, so the client's connection stays usable
        log.exception("internal error on %s", url)
        return _error(500, INTERNAL_ERROR, "server_error")
    finally:
        if not streaming:
            finish(status)


async def _respond(request: Request) -> Response:
    """POST /v1/responses: admitted as one interactive sequence, answered whole or as Responses events."""
    state = get_state(request)
    refuse_if_draining(state)
    body = parse_json(await request.body())
    ticket = state.admission.admit(1, 1)
    service, streaming = state.responses, False
    try:
        if not (isinstance(body, dict) and body.get("stream")):
            return JSONResponse(await _until_disconnect(request, service.create(body)))
        parsed, history, prepared = await service.prepare(body)
        streaming = True
    except ClientGone:
        state.metrics.aborted.inc()
        return Response(status_code=499)
    finally:
        if not streaming:
            ticket.close()

    async def events() -> AsyncIterator[str]:
        try:
            async for event in service.stream(parsed, history, prepared):
                yield event
        finally:
            ticket.close()

    return StreamingResponse(events(), media_type="text/event-stream")


async def _sse(
    first: str, events: AsyncIterator[str], state: ServerState, finish: Callable[[int], None]
) -> AsyncIterator[str]:
    completed = False
    try:
        yield first
        async for event in events:
            yield event
        completed = True
    finally:
        if not completed:
            state.metrics.aborted.inc()
        finish(200 if completed else 499)
        with contextlib.suppress(BaseException):
            await events.aclose()  # type: ignore[attr-defined]
