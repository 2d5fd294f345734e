"""EngineClient: what the server needs of an engine (AsyncLLM provides it), so its dependency is visible."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from shoal.engine.llm_engine import EngineStats
from shoal.engine.request import OutputKind
from shoal.outputs import RequestOutput
from shoal.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str: ...

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]: ...

    def check_prompt_length(self, characters: int) -> None:
        """Refuse text that cannot fit the context whatever its tokens; raises InvalidRequestError."""
        ...

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and check a request without queueing it; raises InvalidRequestError."""
        ...

    def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
        priority: int = 0, output_kind: OutputKind = OutputKind.DELTA,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """RequestOutput deltas until the request finishes (or, STARTED_AND_FINAL: at the first token and at
        the end, complete)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...
