"""`shoal serve --ray`: the same OpenAI server app as a Ray Serve deployment, one engine per replica, behind
Ray Serve's HTTP proxy. Each replica answers with a header naming itself (x-shoal-replica)."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from shoal.ray.cluster import ray_module
from shoal.server.state import ServerConfig


def replica_app(model: str | None, engine_options: dict[str, Any], config: ServerConfig) -> Any:
    """Built on each replica: its own engine, and the server app over it."""
    from shoal.engine.async_llm import AsyncLLM
    from shoal.server.app import build_app

    app = build_app(AsyncLLM(model, **engine_options), config)
    replica = f"{os.uname().nodename}:{os.getpid()}"

    @app.middleware("http")
    async def name_the_replica(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-shoal-replica"] = replica
        return response

    return app


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

    def deployment(self) -> Any:
        from ray import serve

        options = {**self.engine_options, "num_threads": self.num_threads}
        model, config = self.model, self.config

        def builder() -> Any:  # Ray Serve calls a plain function (not a partial) on each replica
            return replica_app(model, options, config)

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
        """Deploy, then serve until SIGINT or SIGTERM."""
        ray_module()
        from ray import serve

        serve.start(http_options={"host": self.host, "port": self.port})
        serve.run(self.deployment(), name="shoal", route_prefix="/")
        print(f"serving on http://{self.host}:{self.port} with {self.replicas} replica(s) on Ray", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
