"""Contexts, their sequences, and chat sessions on them (as node-llama-cpp users know them).

A Context owns one AsyncLLM (its own KV pool) over a shared LoadedModel and hands out N sequences.
A ContextSequence keeps the exact token ids of its conversation; each new turn sends the history plus
the new tokens, and the engine's prefix cache finds the history's full KV blocks, so only the new tokens
(plus the history's last partial block) are computed. Sessions prompted together share engine steps.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic

from shoal.engine.async_llm import AsyncLLM
from shoal.engine.structured_output import strict_schema
from shoal.errors import DisposedError, InvalidRequestError, NoSequenceAvailableError, ShoalError
from shoal.models.loaded import LoadedModel
from shoal.sampling_params import SamplingParams, StructuredOutputsParams

T = TypeVar("T")
TokenCallback = Callable[[str], Awaitable[None] | None]
CLOSE_TIMEOUT_S = 10.0
MIN_ANSWER_ROOM = (
    256  # tokens a turn without max_tokens keeps free for its answer (at most a quarter of the context)
)


class _LoopThread:
    """A private event loop on a daemon thread, for the synchronous API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="shoal-sync-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: the coroutine is cancelled, its request aborted
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@dataclass
class Turn:
    """What one evaluation produced, and what it cost."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int  # history + new tokens sent
    num_cached_tokens: int  # of those, found in the KV cache (not recomputed)
    reasoning: str | None = None  # a reasoning model's thinking before its answer (text holds the answer)

    @property
    def num_computed_prompt_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens


class Context:
    """Context(model, sequences=1, batch_size=512, **engine options such as kv_cache_memory).

    model: a LoadedModel (contexts of one LoadedModel share its weights, each has its own KV pool), a path,
    or None for the default model. `sequences` is how many sequences may generate at once (max_num_seqs);
    batch_size is the most tokens per forward pass (max_num_batched_tokens).
    """

    def __init__(
        self,
        model: LoadedModel | str | None = None,
        sequences: int = 1,
        batch_size: int = 512,
        **engine_options: Any,
    ):
        if sequences < 1:
            raise InvalidRequestError(f"a context needs at least 1 sequence, got {sequences}")
        self.engine = AsyncLLM(
            model, max_num_seqs=sequences, max_num_batched_tokens=batch_size, **engine_options
        )
        self.model: LoadedModel = self.engine.engine.model
        self.tokenizer = self.model.tokenizer
        self.num_sequences = sequences
        self.block_size = self.engine.engine.config.block_size
        self.context_size = self.engine.engine.max_model_len  # tokens a sequence's conversation may hold
        self._free = list(range(sequences))
        self._active: set[str] = set()  # request ids being generated
        self._sync: _LoopThread | None = None
        self._sync_lock = threading.Lock()
        self.closed = False

    @property
    def sequences_left(self) -> int:
        return len(self._free)

    def get_sequence(self) -> ContextSequence:
        """One of the context's sequences; give it back with seq.dispose()."""
        self._check_open()
        if not self._free:
            raise NoSequenceAvailableError(
                f"all {self.num_sequences} sequences of this context are in use: dispose one "
                f"(seq.dispose()) or create the context with more (Context(model, sequences=...))"
            )
        return ContextSequence(self, self._free.pop(0))

    def _give_back(self, index: int) -> None:
        self._free.append(index)
        self._free.sort()

    def _check_open(self) -> None:
        if self.closed:
            raise DisposedError("this context was closed")

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the context's private event loop thread and wait for it (the sync API)."""
        with self._sync_lock:
            if self._sync is None:
                self._sync = _LoopThread()
        return self._sync.run(coro)

    async def aclose(self) -> None:
        """Abort what is still generating, then stop the engine loop."""
        if self.closed:
            return
        self.closed = True
        for request_id in list(self._active):
            await self.engine.abort(request_id)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await self.engine.shutdown()

    def close(self) -> None:
        """The synchronous aclose(); also stops the private loop thread of the sync API."""
        if not self.closed:
            self.run_sync(self.aclose())
        with self._sync_lock:
            if self._sync is not None:
                self._sync.stop()
                self._sync = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Context:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(eq=False)
class ContextSequence:
    """One conversation slot of a context. token_ids is the conversation so far, whose KV the engine keeps."""

    context: Context
    index: int
    token_ids: list[int] = field(default_factory=list)
    disposed: bool = False
    busy: bool = False

    def _check(self) -> None:
        if self.disposed:
            raise DisposedError(
                f"sequence {self.index} was disposed; get another with context.get_sequence()"
            )
        self.context._check_open()

    def clear_history(self) -> None:
        self._check()
        self.token_ids = []

    async def evaluate(
        self, tokens: list[int], params: SamplingParams, on_token: TokenCallback | None = None
    ) -> Turn:
        """Append `tokens` to the conversation, generate a reply, and keep it in the history.

        on_token receives each text delta as it is made (a function or a coroutine function). If the call
        is cancelled or fails, the history stays as it was.
        """
        self._check()
        if self.busy:
            raise ShoalError(
                f"sequence {self.index} is already generating; await that first or use another sequence"
            )
        self.busy = True
        prompt = self.token_ids + list(tokens)
        request_id = f"seq{self.index}-{uuid.uuid4().hex}"
        self.context._active.add(request_id)
        parts: list[str] = []
        thinking: list[str] = []
        output_ids: list[int] = []
        finish, cached = None, 0
        try:
            async for out in self.context.engine.generate(prompt, params, request_id):
                completion = out.outputs[0]
                cached, finish = out.num_cached_tokens, completion.finish_reason
                output_ids += completion.token_ids
                thinking.append(completion.reasoning_content or "")
                if completion.text:
                    parts.append(completion.text)
                    if on_token is not None and inspect.isawaitable(result := on_token(completion.text)):
                        await result
        finally:
            self.busy = False
            self.context._active.discard(request_id)
        if finish == "abort":
            raise ShoalError(f"generation on sequence {self.index} was aborted")
        self.token_ids = prompt + output_ids
        return Turn("".join(parts), output_ids, finish, len(prompt), cached, "".join(thinking) or None)

    def dispose(self) -> None:
        """Give the sequence back to its context. Idempotent."""
        if self.disposed:
            return
        if self.busy:
            raise ShoalError(f"sequence {self.index} is generating; cancel or await it before disposing")
        self.disposed = True
        self.token_ids = []
        self.context._give_back(self.index)


class ChatSession:
    """A chat on one context sequence: keeps the messages, applies the model's chat template, and sends
    only the new turn's tokens after the kept history (so the history's KV is reused)."""

    def __init__(self, sequence: ContextSequence, system_prompt: str | None = None):
        sequence._check()
        self.sequence = sequence
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": system_prompt}] if system_prompt else []
        )
        self.last_turn: Turn | None = None
        self.num_shifted_messages = 0

    @property
    def model(self) -> LoadedModel:
        return self.sequence.context.model

    async def prompt(
        self,
        text: str,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        on_token: TokenCallback | None = None,
        response_format: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        **sampling: Any,
    ) -> Any:
        """Ask `text` as the user; returns the answer. Greedy by default; max_tokens None runs to the end of
        the turn (or the context); other SamplingParams fields (top_p, top_k, seed, stop, ...) as keywords.

        response_format: a pydantic model class (the answer is constrained to its JSON schema and returned
        as an instance of it) or a JSON schema dict (returned as the parsed JSON).

        When the conversation would not leave room for the answer (max_tokens, or MIN_ANSWER_ROOM tokens
        when it is None) in the context, the oldest exchanges are dropped, the system prompt kept (a context
        shift; `num_shifted_messages` counts them)."""
        if response_format is not None:
            sampling["structured_outputs"] = StructuredOutputsParams(json=_schema_of(response_format))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling)
        messages, tokens = self._fit([*self.messages, {"role": "user", "content": text}], max_tokens)
        turn = await self.sequence.evaluate(tokens, params, on_token)
        self.num_shifted_messages += len(self.messages) + 1 - len(messages)
        self.messages = [*messages, {"role": "assistant", "content": turn.text}]
        self.last_turn = turn
        return turn.text if response_format is None else _parse_answer(response_format, turn)

    def _fit(
        self, messages: list[dict[str, str]], max_tokens: int | None
    ) -> tuple[list[dict[str, str]], list[int]]:
        """The messages to send (the oldest exchanges dropped while the answer would not fit) and their new
        tokens. If even the system prompt and the new message leave no room, they go as they are and the
        engine's error says what to change."""
        limit = self.sequence.context.context_size
        room = max_tokens if max_tokens is not None else min(MIN_ANSWER_ROOM, limit // 4)
        while True:
            tokens = self._new_tokens(messages)
            if len(self.sequence.token_ids) + len(tokens) + room <= limit:
                return messages, tokens
            first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages) - 1)
            if first >= len(messages) - 1:
                return messages, tokens
            end = first + 1  # the oldest exchange: a user message and the replies up to the next user message
            while end < len(messages) - 1 and messages[end]["role"] != "user":
                end += 1
            messages = messages[:first] + messages[end:]

    def prompt_sync(self, text: str, **options: Any) -> str:
        """prompt() for scripts without asyncio (runs on the context's private loop thread)."""
        return self.sequence.context.run_sync(self.prompt(text, **options))

    def _new_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens of the rendered conversation after the kept history; the whole of it if the history
        does not render the same (then the sequence's history starts over)."""
        tokenizer = self.model.tokenizer
        rendered = self.model.apply_chat_template(messages, add_generation_prompt=True)
        kept = self.sequence.token_ids
        if kept:
            history = tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if rendered.startswith(history):
                return tokenizer.encode(rendered[len(history) :], add_special_tokens=False)
            self.sequence.clear_history()
        return self.model.chat_template.encode_rendered(rendered)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.sequence.clear_history()
        self.last_turn = None


def _schema_of(response_format: type[pydantic.BaseModel] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(response_format, dict):
        return response_format
    if isinstance(response_format, type) and issubclass(response_format, pydantic.BaseModel):
        return strict_schema(response_format.model_json_schema())
    raise InvalidRequestError(
        f"response_format must be a pydantic model class or a JSON schema dict, got {response_format!r}"
    )


def _parse_answer(response_format: type[pydantic.BaseModel] | dict[str, Any], turn: Turn) -> Any:
    if turn.finish_reason == "length":
        raise ShoalError(f"the answer was cut at max_tokens before its JSON was complete: {turn.text!r}")
    if isinstance(response_format, dict):
        return json.loads(turn.text)
    return response_format.model_validate_json(turn.text)
