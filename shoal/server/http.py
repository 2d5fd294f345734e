"""The HTTP layer under the app: the request-size limits (body 413, headers 431) and the uvicorn server that
drains on SIGTERM and starts background work only once its port is bound."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from shoal.server.protocol import ErrorInfo, ErrorResponse

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_LINGER_S = 2.0  # how long a refused connection keeps reading, so the client can read the refusal


def _error_json(message: str, code: str) -> bytes:
    return ErrorResponse(error=ErrorInfo(message=message, code=code)).model_dump_json().encode()


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes): "
            "send fewer or shorter prompts per request"
        )


@dataclass
class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is read to its end (up to `drain_bytes`, so the
    connection can be reused) and answered 413, before the app parses any of it. Paths in `exempt` (file
    uploads) are not limited here."""

    app: Callable[[Scope, Receive, Send], Awaitable[None]]
    max_bytes: int
    exempt: tuple[str, ...] = ()
    drain_bytes: int = 1 << 30

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(receive, send, keep_alive=await self._drain(receive, 0))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:  # a chunked body that grew past the limit, before any response was sent
            await self._refuse(receive, send, keep_alive=await self._drain(receive, seen))

    async def _drain(self, receive: Receive, seen: int) -> bool:
        """Read and drop the rest of the body; False if it is too large to be worth reading."""
        while seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    async def _refuse(self, receive: Receive, send: Send, keep_alive: bool) -> None:
        body = _error_json(str(BodyTooLarge(self.max_bytes)), "request_too_large")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if not keep_alive:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Connection(h11.Connection):
    """Remembers the status h11 suggests for the last malformed request (431 for oversized headers)."""

    error_status: int = 400

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.error_status = e.error_status_hint
            raise


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering headers over the limit with 431 (not 400) in OpenAI's error shape,
    and reading on for a moment before closing, so the client is not reset before it reads the answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.config.h11_max_incomplete_event_size or 16384)
        self._lingering = False

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        status = self.conn.error_status
        if status == 431:
            limit = self.config.h11_max_incomplete_event_size
            message = f"the request headers are larger than this server's limit of {limit} bytes (--max-header-bytes)"
            code = "headers_too_large"
        else:
            status, message, code = 400, "the request is not valid HTTP/1.1", "invalid_http"
        body = _error_json(message, code)
        head = (
            f"HTTP/1.1 {status} {'Request Header Fields Too Large' if status == 431 else 'Bad Request'}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self._lingering = True
        self.loop.call_later(_LINGER_S, self.transport.close)


class ShoalServer(uvicorn.Server):
    """uvicorn's server: `on_bound` runs once the port is bound (a server that cannot bind starts nothing),
    and SIGINT/SIGTERM call `on_exit` first (the app refuses new work at once), then drain gracefully."""

    def __init__(
        self, config: uvicorn.Config, on_bound: Callable[[], None], on_exit: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self.on_bound = on_bound
        self.on_exit = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)  # exits the process when the port cannot be bound
        if self.started and not self.should_exit:
            self.on_bound()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.on_exit)
        super().handle_exit(sig, frame)
