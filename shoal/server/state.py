"""What every route of the server shares: its configuration, its state (engine, admission, Batch API store and
worker), the API key check, and the API's own errors."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from shoal.engine.protocol import EngineClient
from shoal.server.batch_jobs import DEFAULT_MAX_LINE_BYTES
from shoal.server.batch_store import BatchStore
from shoal.server.batch_worker import BatchWorker
from shoal.server.metrics import ServerMetrics
from shoal.server.serving import OpenAIServing, parse_json

log = logging.getLogger("shoal.server")

DEFAULT_MAX_REQUEST_BYTES = 8 << 20
DEFAULT_MAX_HEADER_BYTES = 64 << 10
TOKENIZER_SLOTS = 2


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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413 (file uploads excepted)
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # larger request headers get 431
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # Batch API input lines; longer ones fail alone


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
    """Counts the interactive sequences (prompts x n) admitted but without a first token, to refuse work past
    max_waiting: a request larger than max_waiting on its own is a 400, one that does not fit now a 503."""

    max_waiting: int
    retry_after_s: int = 1
    waiting: int = 0

    def admit(self, prompts: int, n: int) -> Ticket:
        count = prompts * n
        if count > self.max_waiting:
            raise APIError(
                400,
                f"this request asks for {count} sequences ({prompts} prompts x n={n}) but the server admits at "
                f"most {self.max_waiting} at a time (--max-waiting): send fewer prompts per request, or a lower n",
                code="too_many_sequences",
            )
        if self.waiting + count > self.max_waiting:
            message = (
                f"the server is at capacity ({self.waiting} of {self.max_waiting} sequences waiting for a first "
                f"token, this request needs {count}); retry shortly"
            )
            raise APIError(
                503, message, "server_error", "overloaded", {"Retry-After": str(self.retry_after_s)}
            )
        self.waiting += count
        return Ticket(self, count, n)


@dataclass
class Ticket:
    admission: Admission
    remaining: int
    per_prompt: int  # sequences released at each prompt's first token

    def release_prompt(self) -> None:
        released = min(self.per_prompt, self.remaining)
        self.remaining -= released
        self.admission.waiting -= released

    def close(self) -> None:
        self.admission.waiting -= self.remaining
        self.remaining = 0


@dataclass
class ServerState:
    engine: EngineClient | None  # None for an app that serves only the Batch API
    config: ServerConfig
    serving: OpenAIServing | None
    metrics: ServerMetrics
    admission: Admission
    model_name: str  # what batch objects name as their model
    store: BatchStore | None = None
    worker: BatchWorker | None = None
    responses: Any = None  # the Responses API (a ResponsesService) on an app with an engine
    # /tokenize and /detokenize run at most this many at once, whoever sends them, so a flood of large
    # bodies cannot take every worker thread from generation requests.
    tokenizer_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(TOKENIZER_SLOTS))
    draining: bool = False
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def start_background(self) -> None:
        """Start the Batch API worker; called once the server's port is bound."""
        if self.worker is not None:
            self.worker.start()

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


def refuse_if_draining(state: ServerState) -> None:
    if state.draining:
        headers = {"Retry-After": str(state.config.retry_after_s)}
        raise APIError(
            503, "the server is shutting down; retry on another instance", "server_error", "draining", headers
        )


async def read_json(request: Request) -> Any:
    return parse_json(await request.body())
