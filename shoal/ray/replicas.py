"""Replicas for batch lines: Ray actors that each run one engine and answer OpenAI batch lines exactly as a
single-process `shoal batch` does, and the pool that spreads lines over them. The driver alone writes the
output; a replica that dies is restarted by Ray and the lines it held are retried on it, so every line is
answered exactly once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shoal.ray.cluster import node_id, ray_module


class BatchReplica:
    """One engine answering batch lines; many lines run at once, in one continuous batch."""

    def __init__(
        self, model: str | None, engine_options: dict[str, Any], model_names: tuple[str, ...]
    ) -> None:
        from shoal.engine.async_llm import AsyncLLM
        from shoal.server.serving import OpenAIServing

        self.engine = AsyncLLM(model, **engine_options)
        self.serving = OpenAIServing(self.engine, model_names)
        self.answered = 0

    def ready(self) -> int:
        return os.getpid()

    async def answer(self, line: dict[str, Any], priority: int) -> dict[str, Any]:
        from shoal.server.batch_jobs import answer_line

        record = await answer_line(self.serving, line, priority)
        self.answered += 1
        return record

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": node_id(), "answered": self.answered}


@dataclass
class ReplicaPool:
    """`replicas` BatchReplica actors of `num_threads` CPUs each. answer() sends a line to the replica with
    the fewest lines in flight."""

    model: str | None
    engine_options: dict[str, Any]
    replicas: int = 1
    num_threads: int = 1
    model_names: tuple[str, ...] = ()
    actors: list[Any] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)

    def start(self) -> ReplicaPool:
        ray = ray_module()
        options = {**self.engine_options, "num_threads": self.num_threads}
        actor = ray.remote(BatchReplica).options(
            num_cpus=self.num_threads,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=4096,
            scheduling_strategy="SPREAD",  # one replica per node while there are nodes to spare
        )
        self.actors = [actor.remote(self.model, options, self.model_names) for _ in range(self.replicas)]
        self.in_flight = [0] * self.replicas
        ray.get([a.ready.remote() for a in self.actors])  # each has loaded the model
        return self

    async def answer(self, line: dict[str, Any], priority: int = 0) -> dict[str, Any]:
        index = min(range(len(self.actors)), key=self.in_flight.__getitem__)
        self.in_flight[index] += 1
        try:
            return await self.actors[index].answer.remote(line, priority)
        finally:
            self.in_flight[index] -= 1

    def stats(self) -> list[dict[str, Any]]:
        return ray_module().get([a.stats.remote() for a in self.actors])

    def stop(self) -> None:
        ray = ray_module()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
