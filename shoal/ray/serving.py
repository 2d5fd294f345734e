"""`shoal serve --ray`: the same OpenAI server app as a Ray Serve deployment, one engine per replica, behind
Ray Serve's HTTP proxy. Each replica answers with a header naming itself (x-shoal-replica).

The Batch API keeps one writer: this process (the driver) holds the data dir and runs the Batch API app on a
port of its own; the replicas forward /v1/files and /v1/batches to it, and its worker sends each line back
through the proxy, so the lines spread over the replicas."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from shoal.ray.cluster import node_id, ray_module
from shoal.server.serving import error_body
from shoal.server.state import ServerConfig

_RETRY_STATUSES = (502, 503, 504)  # a replica restarting, full or draining: the line is tried again
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def replica_app(
    model: str | None, engine_options: dict[str, Any], config: ServerConfig, batch_api_url: str | None
) -> Any:
    """Built on each replica: its own engine, and the server app over it."""
    from shoal.engine.async_llm import AsyncLLM
    from shoal.server.app import build_app

    app = build_app(AsyncLLM(model, **engine_options), config)
    if batch_api_url is not None:
        app.router.routes[:0] = _forwarding_routes(batch_api_url)  # before the app's own (storeless) ones
    replica = f"{os.uname().nodename}:{os.getpid()}@{node_id()[:12]}"  # host, process, Ray node

    @app.middleware("http")
    async def name_the_replica(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-shoal-replica"] = replica
        return response

    return app


def _forwarding_routes(url: str) -> list[Any]:
    """/v1/files... and /v1/batches... passed through, streamed both ways, to the driver's Batch API."""
    import httpx

    client = httpx.AsyncClient(base_url=url, timeout=None)
    router = APIRouter()

    async def forward(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        upstream = client.build_request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=request.stream(),
        )
        try:
            response = await client.send(upstream, stream=True)
        except httpx.TransportError:
            message = "the Batch API (on the driver) is not reachable yet; retry shortly"
            return JSONResponse(error_body(message, "server_error", "unavailable"), 503, {"Retry-After": "1"})
        back = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
        return StreamingResponse(
            response.aiter_raw(),
            response.status_code,
            headers=back,
            background=BackgroundTask(response.aclose),
        )

    for prefix in ("/v1/files", "/v1/batches"):
        for path in (prefix, prefix + "/{rest:path}"):
            router.add_api_route(path, forward, methods=["GET", "POST", "DELETE"], include_in_schema=False)
    return router.routes


@dataclass
class HttpAnswerer:
    """Answers batch lines by sending them to an OpenAI server (the Ray Serve proxy), as output records of
    the same shape answer_line gives; a line the replicas cannot take right now is tried again."""

    url: str
    retries: int = 30

    def __post_init__(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=self.url, timeout=None)

    async def answer(self, line: dict[str, Any], priority: int = 0) -> dict[str, Any]:
        import httpx

        from shoal.server.batch_jobs import NO_STREAM, response_record
        from shoal.server.protocol import random_id

        cid, body = line["custom_id"], dict(line["body"])
        if body.get("stream"):
            return response_record(
                cid,
                400,
                random_id("batch-req-"),
                error_body(NO_STREAM),
            )
        body["priority"] = (body.get("priority") if isinstance(body.get("priority"), int) else 0) + priority
        for attempt in range(self.retries):
            try:
                response = await self.client.post(line["url"], json=body)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code not in _RETRY_STATUSES:
                answer = response.json()
                return response_record(
                    cid, response.status_code, answer.get("id") or random_id("batch-req-"), answer
                )
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        return response_record(
            cid, 503, random_id("batch-req-"), error_body("no replica answered", "server_error")
        )


@dataclass
class RayServer:
    model: str | None
    engine_options: dict[str, Any]
    config: ServerConfig
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    num_threads: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None

    def deployment(self, batch_api_url: str | None) -> Any:
        from dataclasses import replace

        from ray import serve

        options = {**self.engine_options, "num_threads": self.num_threads}
        model, config = self.model, replace(self.config, data_dir=None)

        def builder() -> Any:  # Ray Serve calls a plain function (not a partial) on each replica
            return replica_app(model, options, config, batch_api_url)

        scaling: dict[str, Any] = {"num_replicas": self.replicas}
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            scaling = {
                "autoscaling_config": {
                    "min_replicas": low,
                    "max_replicas": self.max_replicas
                    if self.max_replicas is not None
                    else max(low, self.replicas),
                    "initial_replicas": self.replicas,
                }
            }
        deployment = serve.deployment(serve.ingress(builder)(), name="shoal")
        return deployment.options(ray_actor_options={"num_cpus": self.num_threads}, **scaling).bind()

    def run(self) -> None:
        """Lock the data dir (if any), deploy, start the Batch API here, then serve until SIGINT or SIGTERM."""
        ray = ray_module()
        from ray import serve

        from shoal.server.batch_store import BatchStore

        store = BatchStore(self.config.data_dir) if self.config.data_dir is not None else None
        host = ray.util.get_node_ip_address()
        batch_port = _free_port(host)
        serve.start(http_options={"host": self.host, "port": self.port})
        serve.run(
            self.deployment(f"http://{host}:{batch_port}" if store else None), name="shoal", route_prefix="/"
        )
        batch_server = self._start_batch_api(store, host, batch_port) if store else None
        print(f"serving on http://{self.host}:{self.port} with {self.replicas} replica(s) on Ray", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        if batch_server is not None:
            batch_server.should_exit = True
        serve.shutdown()

    def _start_batch_api(self, store: Any, host: str, port: int) -> Any:
        import httpx

        from shoal.server.app import build_batch_app, make_server

        proxy = f"http://127.0.0.1:{self.port}"
        models = httpx.get(proxy + "/v1/models", headers=_auth(self.config), timeout=60).json()
        answerer = HttpAnswerer(proxy)
        app = build_batch_app(self.config, store, answerer.answer, models["data"][0]["id"])
        server = make_server(app, host, port, log_level="warning")
        threading.Thread(
            target=lambda: asyncio.run(server.serve()), name="shoal-batch-api", daemon=True
        ).start()
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return server


def _auth(config: ServerConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
