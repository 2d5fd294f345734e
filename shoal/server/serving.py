"""The one way to turn an OpenAI request body into engine work, and engine output back into OpenAI objects.

Used by the HTTP routes, the Batch API worker and the offline `shoal batch` runner alike.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from shoal.engine.protocol import EngineClient
from shoal.engine.request import OutputKind
from shoal.errors import InvalidRequestError, ShoalError
from shoal.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from shoal.sampling_params import SamplingParams
from shoal.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    random_id,
)

GenerationRequest = CompletionRequest | ChatCompletionRequest
REQUEST_TYPES: dict[str, type[GenerationRequest]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
_SHAPE_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "messages": "a list of {role, content} messages, or a list of such lists (one per conversation)",
    "stop": "a string or a list of strings",
}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve."""


class OutputObserver(Protocol):
    def on_output(self, prompt_index: int, out: RequestOutput) -> None: ...


@dataclass
class Prepared:
    """A validated request: the engine prompts (one per prompt or conversation) and their sampling params."""

    request: GenerationRequest
    prompts: list[str | list[int]]
    params: SamplingParams
    route: _Route
    echo: list[str] | None = None  # completions echo: text to put before each prompt's choices

    def choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.params.n + sample_index


def validation_message(error: ValidationError) -> str:
    """A short, human message for a pydantic error: which field, what was wrong, what is expected."""
    by_field: dict[str, list[dict[str, Any]]] = {}
    for err in error.errors():
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "body", []).append(err)
    return "invalid request: " + "; ".join(_field_message(name, errs) for name, errs in by_field.items())


def _field_message(name: str, errors: list[dict[str, Any]]) -> str:
    err = max(errors, key=lambda e: len(_value_path(e["loc"])))  # the most specific one
    path = _value_path(err["loc"])
    if name in _SHAPE_HINTS and len(err["loc"]) > 1:
        hint = f"'{name}' must be {_SHAPE_HINTS[name]}"
        return f"{_described(path, err)}; {hint}" if name == "messages" and len(path) > 2 else hint
    if err["type"] == "missing":
        return f"'{name}' is required"
    return _described(path, err)


def _value_path(loc: tuple) -> list[str | int]:
    """loc without pydantic's union-branch tags ('str', 'list[ChatMessage]', ...)."""
    return [p for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]


def _described(path: list[str | int], err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in path)
    return f"'{where}': {err['msg']} (got {json.dumps(err.get('input'), default=str)[:80]})"


def parse_json(raw: bytes | str) -> Any:
    """Standard JSON only: NaN and Infinity, which Python's json accepts, are refused."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON ({e}); send a JSON object") from e
    except RecursionError:
        raise InvalidRequestError(
            "the request body is nested too deeply; send a flatter JSON object"
        ) from None


def _refuse_constant(name: str) -> Any:
    raise InvalidRequestError(f"{name} is not valid JSON (numbers must be finite); send a finite number")


def parse_request(url: str, body: Any) -> GenerationRequest:
    """Validate a JSON body for `url` (a generation route) into its request model."""
    if url not in REQUEST_TYPES:
        raise InvalidRequestError(f"url must be one of {list(REQUEST_TYPES)}, got {url!r}")
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return REQUEST_TYPES[url].model_validate(body)
    except ValidationError as e:
        raise InvalidRequestError(validation_message(e)) from e


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, code=code)).model_dump()


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _unsupported(condition: Any, message: str) -> None:
    if condition:
        raise InvalidRequestError(message)


@dataclass
class OpenAIServing:
    """Runs OpenAI-shaped requests on an AsyncLLM."""

    engine: EngineClient
    model_names: Sequence[str] = ()
    max_n: int = 16

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    # ------------------------------------------------------------ request -> engine work

    async def prepare(self, request: GenerationRequest) -> Prepared:
        """Validate and render a request, on a worker thread: chat templates and long prompts take time
        that must not stall the event loop (and every other client with it)."""
        return await asyncio.to_thread(self._prepare, request)

    def _prepare(self, request: GenerationRequest) -> Prepared:
        names = {self.model_name, *self.model_names}
        if request.model is not None and request.model not in names:
            raise ModelNotFoundError(
                f"model {request.model!r} does not exist; this server serves {sorted(names)}"
            )
        if not 1 <= request.n <= self.max_n:
            raise InvalidRequestError(f"n must be between 1 and {self.max_n}, got {request.n}")
        _unsupported(request.logit_bias, "logit_bias is not supported; remove it")
        if isinstance(request, ChatCompletionRequest):
            return self._prepare_chat(request)
        return self._prepare_completion(request)

    def _sampling_params(
        self, request: GenerationRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        return SamplingParams(
            n=request.n,
            max_tokens=max_tokens,
            logprobs=logprobs,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids or [],
            seed=request.seed,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            **_drop_none(
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                min_p=request.min_p,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty,
            ),
        )

    def _prepare_completion(self, request: CompletionRequest) -> Prepared:
        _unsupported(request.suffix, "suffix is not supported; remove it")
        _unsupported(request.best_of not in (None, request.n), "best_of is not supported; use n")
        _unsupported(
            request.echo and request.logprobs is not None,
            "echo with logprobs is not supported (prompt logprobs are not computed); drop one of them",
        )
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("prompt must not be empty")
        params = self._sampling_params(request, request.max_tokens, request.logprobs)
        echo = (
            [p if isinstance(p, str) else self.engine.tokenizer.decode(p) for p in prompts]
            if request.echo
            else None
        )
        return Prepared(request, prompts, params, COMPLETIONS, echo)

    def _prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        _unsupported(request.tools, "tools are not supported; remove them")
        fmt = (request.response_format or {}).get("type", "text")
        _unsupported(fmt != "text", f"response_format {fmt!r} is not supported; only 'text'")
        _unsupported(
            request.top_logprobs is not None and not request.logprobs, "top_logprobs needs logprobs: true"
        )
        messages = request.messages
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        if not conversations or any(not conv for conv in conversations):
            raise InvalidRequestError("messages must not be empty")
        prompts: list[str | list[int]] = [
            self._render_chat(conv, request.add_generation_prompt) for conv in conversations
        ]  # type: ignore[arg-type]
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = (
            request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        )
        return Prepared(request, prompts, self._sampling_params(request, max_tokens, logprobs), CHAT)

    def _render_chat(self, conversation: list, add_generation_prompt: bool) -> str:
        messages = []
        for m in conversation:
            message = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                kinds = {part.type for part in m.content}
                _unsupported(kinds - {"text"}, f"only text content parts are supported, got {sorted(kinds)}")
                message["content"] = "".join(part.text or "" for part in m.content)
            messages.append(message)
        try:
            return self.engine.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except ShoalError:
            raise
        except Exception as e:  # a template's raise_exception() or a malformed message
            raise InvalidRequestError(f"the chat template rejected these messages: {e}") from e

    # ------------------------------------------------------------ engine output -> OpenAI objects

    async def outputs(
        self,
        prepared: Prepared,
        request_id: str,
        priority: int,
        observer: OutputObserver | None = None,
        kind: OutputKind = OutputKind.DELTA,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of every prompt of the request (deltas, or `kind`), as (prompt index, output), merged as
        they come."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: str | list[int]) -> None:
            try:
                stream = self.engine.generate(
                    prompt,
                    prepared.params,
                    request_id=f"{request_id}-{i}",
                    priority=priority,
                    output_kind=kind,
                )
                async with aclosing(stream) as outs:
                    async for out in outs:
                        queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prepared.prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    if observer is not None:
                        observer.on_output(i, item)
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def complete(
        self, prepared: Prepared, request_id: str, priority: int, observer: OutputObserver | None = None
    ) -> CompletionResponse | ChatCompletionResponse:
        """Run a request to the end and answer with the whole response object. The engine reports each
        prompt twice: at its first token (for admission and time-to-first-token) and complete at the end."""
        acc = _Accumulator(prepared)
        kind = OutputKind.STARTED_AND_FINAL
        async with aclosing(self.outputs(prepared, request_id, priority, observer, kind)) as events:
            async for i, out in events:
                acc.add(i, out)
        return acc.response(request_id, self.model_name)

    async def stream(
        self, prepared: Prepared, request_id: str, priority: int, observer: OutputObserver | None = None
    ) -> AsyncIterator[str]:
        """Server-sent events for a streaming request, ending with `data: [DONE]`.

        An error before the first event is raised; after it, it is sent as an error event.
        """
        chunks = _Chunker(prepared, request_id, self.model_name)
        sent = False
        try:
            async with aclosing(self.outputs(prepared, request_id, priority, observer)) as events:
                async for i, out in events:
                    chunk = chunks.chunk(i, out)
                    if chunk is not None:
                        sent = True
                        yield f"data: {chunk}\n\n"
        except ShoalError as e:
            if not sent:
                raise
            yield f"data: {json.dumps(error_body(str(e)))}\n\n"
        else:
            usage = prepared.request.stream_options and prepared.request.stream_options.include_usage
            if usage:
                yield f"data: {chunks.usage_chunk()}\n\n"
        yield "data: [DONE]\n\n"


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False
    text_offset: int = 0


class _Usage:
    def __init__(self) -> None:
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens: dict[tuple[int, int], int] = {}  # per (prompt, sample)

    def add(self, prompt_index: int, out: RequestOutput, cumulative: bool = False) -> None:
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        for c in out.outputs:
            key = (prompt_index, c.index)
            self.completion_tokens[key] = (0 if cumulative else self.completion_tokens.get(key, 0)) + len(
                c.token_ids
            )

    def usage(self) -> Usage:
        prompt, completion = sum(self.prompt_tokens.values()), sum(self.completion_tokens.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Accumulator:
    """Keeps each choice's latest complete output (STARTED_AND_FINAL outputs are cumulative)."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        n = len(prepared.prompts) * prepared.params.n
        self.choices = [_ChoiceState() for _ in range(n)]
        self.usage = _Usage()

    def add(self, i: int, out: RequestOutput) -> None:
        self.usage.add(i, out, cumulative=True)
        for c in out.outputs:
            state = self.choices[self.prepared.choice_index(i, c.index)]
            state.text, state.token_ids, state.logprobs = [c.text], list(c.token_ids), list(c.logprobs or [])
            state.finish_reason = c.finish_reason

    def response(self, request_id: str, model: str) -> CompletionResponse | ChatCompletionResponse:
        p = self.prepared
        choices = [p.route.final_choice(p, k, state) for k, state in enumerate(self.choices)]
        return p.route.response(id=request_id, model=model, choices=choices, usage=self.usage.usage())


class _Chunker:
    """Turns delta outputs into streaming chunk JSON."""

    def __init__(self, prepared: Prepared, request_id: str, model: str) -> None:
        self.prepared = prepared
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.choices = [_ChoiceState() for _ in range(len(prepared.prompts) * prepared.params.n)]
        self.usage = _Usage()

    def chunk(self, i: int, out: RequestOutput) -> str | None:
        self.usage.add(i, out)
        choices = [c for c in (self._choice(i, o) for o in out.outputs) if c is not None]
        if not choices:
            return None
        chunk = self.prepared.route.chunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices
        )
        return chunk.model_dump_json()

    def _choice(self, i: int, o: CompletionOutput) -> CompletionChoice | ChatChunkChoice | None:
        k = self.prepared.choice_index(i, o.index)
        state = self.choices[k]
        if state.started and not (o.text or o.token_ids or o.finish_reason):
            return None
        choice = self.prepared.route.delta_choice(self.prepared, i, k, state, o)
        state.started = True
        return choice

    def usage_chunk(self) -> str:
        route = self.prepared.route
        return route.chunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=self.usage.usage()
        ).model_dump_json()


class _Route:
    """What differs between /v1/completions and /v1/chat/completions in their answers."""

    id_prefix: str
    response: type
    chunk: type

    def final_choice(self, p: Prepared, k: int, s: _ChoiceState) -> Any: ...

    def delta_choice(self, p: Prepared, i: int, k: int, state: _ChoiceState, o: CompletionOutput) -> Any: ...


class _CompletionsRoute(_Route):
    id_prefix, response, chunk = "cmpl-", CompletionResponse, CompletionResponse

    def final_choice(self, p: Prepared, k: int, s: _ChoiceState) -> CompletionChoice:
        prefix = p.echo[k // p.params.n] if p.echo else ""
        logprobs = _completion_logprobs(s.token_ids, s.logprobs, p.params.logprobs, 0)
        return CompletionChoice(
            index=k, text=prefix + "".join(s.text), logprobs=logprobs, finish_reason=s.finish_reason
        )

    def delta_choice(
        self, p: Prepared, i: int, k: int, state: _ChoiceState, o: CompletionOutput
    ) -> CompletionChoice:
        text = o.text if state.started or not p.echo else p.echo[i] + o.text
        logprobs = _completion_logprobs(o.token_ids, o.logprobs or [], p.params.logprobs, state.text_offset)
        state.text_offset += len(text)
        return CompletionChoice(index=k, text=text, logprobs=logprobs, finish_reason=o.finish_reason)


class _ChatRoute(_Route):
    id_prefix, response, chunk = "chatcmpl-", ChatCompletionResponse, ChatCompletionChunk

    def final_choice(self, p: Prepared, k: int, s: _ChoiceState) -> ChatChoice:
        return ChatChoice(
            index=k,
            message=ChatResponseMessage(content="".join(s.text)),
            logprobs=_chat_logprobs(s.token_ids, s.logprobs, p.params.logprobs),
            finish_reason=s.finish_reason,
        )

    def delta_choice(
        self, p: Prepared, i: int, k: int, state: _ChoiceState, o: CompletionOutput
    ) -> ChatChunkChoice:
        delta = ChatDelta(role=None if state.started else "assistant", content=o.text)
        logprobs = _chat_logprobs(o.token_ids, o.logprobs or [], p.params.logprobs)
        return ChatChunkChoice(index=k, delta=delta, logprobs=logprobs, finish_reason=o.finish_reason)


COMPLETIONS, CHAT = _CompletionsRoute(), _ChatRoute()


def _ranked(entry: TokenLogprobs, k: int) -> list[tuple[int, Any]]:
    return sorted(((tid, lp) for tid, lp in entry.items() if lp.rank <= k), key=lambda x: x[1].rank)[:k]


def _completion_logprobs(
    token_ids: list[int], logprobs: list[TokenLogprobs], k: int | None, offset: int
) -> CompletionLogprobs | None:
    if k is None:
        return None
    result = CompletionLogprobs()
    for tid, entry in zip(token_ids, logprobs, strict=False):
        chosen = entry.get(tid)
        token = chosen.decoded_token if chosen else ""
        result.tokens.append(token)
        result.token_logprobs.append(chosen.logprob if chosen else None)
        result.top_logprobs.append(
            {lp.decoded_token: lp.logprob for _, lp in _ranked(entry, k)} if k else None
        )
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], k: int | None) -> ChatLogprobs | None:
    if k is None:
        return None
    content = []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        chosen = entry.get(tid)
        token = chosen.decoded_token if chosen else ""
        top = [
            TopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode()))
            for _, lp in _ranked(entry, k)
        ]
        logprob = chosen.logprob if chosen else float("-inf")
        content.append(
            TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def new_request_id(prepared: Prepared) -> str:
    return random_id(prepared.route.id_prefix)
