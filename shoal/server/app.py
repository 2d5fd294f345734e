"""The OpenAI-compatible HTTP server over an AsyncLLM: generation routes, the Batch API, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.engine.protocol import EngineClient
from shoal.errors import EngineDeadError, InvalidRequestError
from shoal.server.batch_store import BatchStore
from shoal.server.batch_worker import BatchWorker
from shoal.server.metrics import RequestTiming, ServerMetrics
from shoal.server.multipart import save_upload
from shoal.server.protocol import (
    FINAL_STATUSES,
    Batch,
    BatchCreateRequest,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
    ModelCard,
    ModelList,
    now,
    random_id,
)
from shoal.server.serving import (
    ModelNotFoundError,
    OpenAIServing,
    error_body,
    new_request_id,
    parse_request,
    validation_message,
)

log = logging.getLogger("shoal.server")
T = TypeVar("T")


@dataclass
class ServerConfig:
    model_names: tuple[str, ...] = ()  # names accepted in `model` besides engine.model_name
    api_key: str | None = None
    max_waiting: int = 256  # interactive requests admitted but without a first token; more get 503
    max_n: int = 16
    data_dir: Path | None = None  # Batch API state; None disables /v1/files and /v1/batches
    batch_priority: int = 10  # added to batch lines' priority (lower runs first)
    batch_concurrency: int = 32
    batch_checkpoint_s: float = 1.0
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class Admission:
    """Counts interactive requests that wait for their first token, to refuse work past max_waiting."""

    max_waiting: int
    retry_after_s: int = 1
    waiting: int = 0

    def admit(self, count: int) -> Ticket:
        if self.waiting >= self.max_waiting:
            message = f"the server is at capacity ({self.waiting} requests waiting); retry shortly"
            raise APIError(
                503, message, "server_error", "overloaded", {"Retry-After": str(self.retry_after_s)}
            )
        self.waiting += count
        return Ticket(self, count)


@dataclass
class Ticket:
    admission: Admission
    remaining: int

    def release_one(self) -> None:
        if self.remaining > 0:
            self.remaining -= 1
            self.admission.waiting -= 1

    def close(self) -> None:
        self.admission.waiting -= self.remaining
        self.remaining = 0


@dataclass
class ServerState:
    engine: EngineClient
    config: ServerConfig
    serving: OpenAIServing
    metrics: ServerMetrics
    admission: Admission
    store: BatchStore | None = None
    worker: BatchWorker | None = None
    draining: bool = False
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work and stop batch work (it resumes on restart); in-flight requests finish."""
        if not self.draining:
            self.draining = True
            log.info("draining: refusing new requests, finishing in-flight ones")
            if self.worker is not None:
                task = asyncio.create_task(self.worker.stop())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


def get_state(request: Request) -> ServerState:
    return request.app.state.shoal


def check_api_key(request: Request) -> None:
    key = get_state(request).config.api_key
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


def build_app(engine: EngineClient, config: ServerConfig | None = None) -> FastAPI:
    """The server app. It owns `engine`: the engine is shut down with the app."""
    config = config or ServerConfig()
    serving = OpenAIServing(engine, config.model_names, config.max_n)
    state = ServerState(
        engine, config, serving, ServerMetrics(engine), Admission(config.max_waiting, config.retry_after_s)
    )
    if config.data_dir is not None:
        state.store = BatchStore(config.data_dir)
        state.worker = BatchWorker(
            state.store, serving, config.batch_priority, config.batch_concurrency, config.batch_checkpoint_s
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.worker is not None:
            state.worker.start()
        try:
            yield
        finally:
            if state.worker is not None:
                await state.worker.stop()
            if state.store is not None:
                state.store.close()
            await engine.shutdown()

    app = FastAPI(title="shoal", lifespan=lifespan)
    app.state.shoal = state
    _add_error_handlers(app)
    app.include_router(_public_routes())
    app.include_router(_generation_routes(), dependencies=[Depends(check_api_key)])
    app.include_router(_batch_routes(), dependencies=[Depends(check_api_key)])
    return app


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
        return _error(400, str(e), code="model_not_found" if isinstance(e, ModelNotFoundError) else None)

    @app.exception_handler(RequestValidationError)
    async def unparsable(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, _fastapi_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError) -> JSONResponse:
        return _error(500, f"the engine stopped: {e}", "server_error", "engine_dead")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return _error(500, f"internal error: {e}", "server_error")


def _fastapi_message(e: RequestValidationError) -> str:
    parts = [f"'{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in e.errors()]
    return "invalid request: " + "; ".join(parts)


def _refuse_if_draining(state: ServerState) -> None:
    if state.draining:
        headers = {"Retry-After": str(state.config.retry_after_s)}
        raise APIError(
            503, "the server is shutting down; retry on another instance", "server_error", "draining", headers
        )


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON ({e}); send a JSON object") from e


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

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, "/v1/completions")

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "/v1/chat/completions")

    return router


async def _generate(request: Request, url: str) -> Response:
    state = get_state(request)
    arrival = time.perf_counter()
    _refuse_if_draining(state)
    body = parse_request(url, await _read_json(request))
    prepared = state.serving.prepare(body)
    request_id = new_request_id(prepared)
    ticket = state.admission.admit(len(prepared.prompts))
    state.metrics.waiting.set(state.admission.waiting)
    timing = RequestTiming(state.metrics, arrival, ticket.release_one)

    def finish(status: int) -> None:
        ticket.close()
        state.metrics.waiting.set(state.admission.waiting)
        state.metrics.requests.labels(url, str(status)).inc()
        state.metrics.e2e.observe(time.perf_counter() - arrival)

    try:
        if body.stream:
            events = state.serving.stream(prepared, request_id, body.priority, timing)
            first = await _until_disconnect(request, anext(events))
            return StreamingResponse(_sse(first, events, state, finish), media_type="text/event-stream")
        response = await _until_disconnect(
            request, state.serving.complete(prepared, request_id, body.priority, timing)
        )
        finish(200)
        return JSONResponse(response.model_dump())
    except ClientGone:
        state.metrics.aborted.inc()
        finish(499)
        return Response(status_code=499)
    except InvalidRequestError:
        finish(400)
        raise
    except BaseException:
        finish(500)
        raise


async def _sse(first: str, events: AsyncIterator[str], state: ServerState, finish: Any) -> AsyncIterator[str]:
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


def _batch_routes() -> APIRouter:
    router = APIRouter()

    def store_of(request: Request) -> BatchStore:
        store = get_state(request).store
        if store is None:
            raise APIError(404, "the Batch API is off: start the server with --data-dir")
        return store

    @router.post("/v1/files")
    async def upload_file(request: Request) -> FileObject:
        store = store_of(request)
        _refuse_if_draining(get_state(request))
        file_id = random_id("file-")
        dest = store.files_dir / f"{file_id}.jsonl"
        try:
            upload = await save_upload(
                request.stream(), request.headers.get("content-type", ""), "file", dest
            )
            purpose = upload.fields.get("purpose")
            if upload.filename is None:
                raise InvalidRequestError("the upload has no 'file' part")
            if purpose != "batch":
                raise InvalidRequestError(
                    f"purpose must be 'batch' (the only kind of file this server keeps), got {purpose!r}"
                )
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        file = FileObject(id=file_id, bytes=upload.size, filename=upload.filename, purpose=purpose)
        return store.put_file(file, dest)

    @router.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None) -> FileList:
        return FileList(data=store_of(request).list_files(purpose))

    @router.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> FileObject:
        return _find_file(store_of(request), file_id)[0]

    @router.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> FileResponse:
        file, path = _find_file(store_of(request), file_id)
        return FileResponse(path, media_type="application/jsonl", filename=file.filename)

    @router.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> FileDeleted:
        if not store_of(request).delete_file(file_id):
            raise APIError(404, f"no file with id {file_id!r}")
        return FileDeleted(id=file_id)

    @router.post("/v1/batches")
    async def create_batch(request: Request) -> Batch:
        state, store = get_state(request), store_of(request)
        _refuse_if_draining(state)
        body = _validate(BatchCreateRequest, await _read_json(request))
        file, _ = _find_file(store, body.input_file_id, status=400)
        if file.purpose != "batch":
            raise InvalidRequestError(
                f"file {file.id} has purpose {file.purpose!r}; upload the input with purpose 'batch'"
            )
        created = now()
        batch = Batch(
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
            model=state.engine.model_name,
            created_at=created,
            expires_at=created + 86_400,
        )
        store.put_batch(batch)
        assert state.worker is not None
        state.worker.notify()
        return batch

    @router.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> BatchList:
        batches, more = store_of(request).list_batches(max(1, min(limit, 100)), after)
        first, last = (batches[0].id, batches[-1].id) if batches else (None, None)
        return BatchList(data=batches, first_id=first, last_id=last, has_more=more)

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str) -> Batch:
        return _find_batch(store_of(request), batch_id)

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Batch:
        state, store = get_state(request), store_of(request)
        batch = _find_batch(store, batch_id)
        if batch.status in FINAL_STATUSES and batch.status != "cancelled":
            raise APIError(
                409, f"batch {batch_id} is already {batch.status}; only unfinished batches can be cancelled"
            )
        if batch.status in ("validating", "in_progress", "finalizing"):
            batch = store.put_batch(batch.model_copy(update={"status": "cancelling", "cancelling_at": now()}))
            assert state.worker is not None
            state.worker.cancel(batch_id)
        return batch

    return router


def _validate(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequestError(validation_message(e)) from e


def _find_file(store: BatchStore, file_id: str, status: int = 404) -> tuple[FileObject, Path]:
    found = store.get_file(file_id)
    if found is None or not found[1].exists():
        raise APIError(status, f"no file with id {file_id!r}")
    return found


def _find_batch(store: BatchStore, batch_id: str) -> Batch:
    batch = store.get_batch(batch_id)
    if batch is None:
        raise APIError(404, f"no batch with id {batch_id!r}")
    return batch
