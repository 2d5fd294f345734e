"""AsyncLLM: the engine loop on a background thread; many coroutines stream from one shared batch."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shoal.engine.llm_engine import EngineStats, LLMEngine
from shoal.engine.request import OutputKind
from shoal.errors import EngineDeadError, InvalidRequestError, ShoalError
from shoal.models.loaded import LoadedModel
from shoal.outputs import RequestOutput
from shoal.sampling_params import SamplingParams

logger = logging.getLogger("shoal")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    """AsyncLLM(model=None, **engine options). `async for out in engine.generate(...)` yields deltas.

    Cancelling the consumer (or abort(request_id)) removes the request before the next step and frees its
    KV blocks; the other requests go on untouched.
    """

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        engine: LLMEngine | None = None,
        **engine_options: Any,
    ):
        self.engine = engine or LLMEngine.from_options(model, engine_options)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model.name
        self.max_model_len = self.engine.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stats = self.engine.stats()
        self._dead: str | None = None
        self._thread = threading.Thread(target=self._loop, name="shoal-engine", daemon=True)
        self.engine.model.backend.release_thread_team()  # the engine thread's team is then the only one
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        return self.engine.model.apply_chat_template(messages, add_generation_prompt, tools, template_kwargs)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The conversation as prompt token ids (see LoadedModel.render_chat)."""
        return self.engine.model.render_chat(messages, add_generation_prompt, tools, template_kwargs)

    def check_prompt_length(self, characters: int) -> None:
        """Refuse text that cannot fit the context whatever its tokens (InvalidRequestError), untokenized."""
        self.engine.check_prompt_length(characters)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and check a request without queueing it; raises InvalidRequestError."""
        return self.engine.process_input(prompt, params).token_ids

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.DELTA,
    ) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutput deltas: each completion holds only new text, token ids and logprobs. With
        output_kind=STARTED_AND_FINAL: one output at the first token, then the complete one."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running ({self._dead}); create a new AsyncLLM")
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        finished = False
        try:
            # Tokenized once, on a worker thread: neither the engine thread nor the event loop waits for it.
            processed = await asyncio.to_thread(self.engine.process_input, prompt, params)
            self._commands.put(("add", request_id, processed, priority, output_kind))
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise (InvalidRequestError if item.error_is_invalid_request else ShoalError)(item.error)
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self) -> None:
        """Stop the loop; requests still streaming get EngineDeadError."""
        self._commands.put(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._drain(block=idle):
                    self._fail_all("shut down")
                    return
                for out in self.engine.step():
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                self._stats = self.engine.stats()
        except BaseException as exc:  # the engine is unusable: every waiting stream learns why
            logger.exception("engine loop failed")
            self._fail_all(f"the engine loop failed: {exc!r}")

    def _fail_all(self, reason: str) -> None:
        self._dead = reason
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError(f"the engine is not running ({reason})"))

    def _drain(self, block: bool) -> bool:
        """Apply queued adds and aborts. Returns False on stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        stop = False
        while True:
            if command[0] == "stop":
                stop = True  # still apply aborts queued with it
            else:
                self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return not stop

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            return
        _, request_id, processed, priority, output_kind = command
        if request_id not in self._streams:  # cancelled before it was queued
            return
        try:
            self.engine.add_request(processed, None, request_id, priority, output_kind)
        except Exception as exc:
            self._streams[request_id].put(exc)
