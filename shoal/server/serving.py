"""The one way to turn an OpenAI request body into engine work, and engine output back into OpenAI objects.

Used by the HTTP routes, the Batch API worker and the offline `shoal batch` runner alike.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from shoal.engine.protocol import EngineClient
from shoal.engine.request import OutputKind
from shoal.engine.structured_output import strict_schema
from shoal.errors import InvalidRequestError, ShoalError
from shoal.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from shoal.sampling_params import SamplingParams, StructuredOutputsParams, check_text
from shoal.server.protocol import (
    TEXT_PARTS,
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
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    FunctionCallDelta,
    NamedToolChoice,
    PromptLogprob,
    PromptLogprobs,
    ResponseFormat,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    random_id,
)
from shoal.server.tools import ToolCallStream, ToolParser, ToolPlan, ToolSyntax, conversation_for_template

GenerationRequest = CompletionRequest | ChatCompletionRequest
B = TypeVar("B", bound=BaseModel)
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
    """The request names a model this server does not serve (404, as OpenAI answers it)."""


INTERNAL_ERROR = "internal error; the server log has the details"


def error_status(e: InvalidRequestError) -> tuple[int, str | None]:
    """(HTTP status, error code) of a request's own error."""
    return (404, "model_not_found") if isinstance(e, ModelNotFoundError) else (400, None)


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
    tools: ToolPlan | None = None  # chat with tools: answers are parsed into tool calls
    parser: ToolParser | None = None  # with tools: reads the calls out of the answer's token ids
    decode: Callable[[list[int]], str] | None = None  # completions: the tokenizer's, for echoed tokens

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
        return f"'{'.'.join(str(p) for p in path)}' is required"
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
    return parse_body(REQUEST_TYPES[url], body)


def parse_body(model: type[B], body: Any) -> B:
    """A JSON body validated into `model`; InvalidRequestError saying what is wrong otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequestError(validation_message(e)) from e


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, code=code)).model_dump()


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _choice_name(choice: Any) -> str:
    return choice if isinstance(choice, str) else choice.function.name


def _structured_outputs(
    request: GenerationRequest, response_format: ResponseFormat | None
) -> StructuredOutputsParams | None:
    """The one structured-output spec of a request, from response_format, structured_outputs or vLLM's
    older guided_* fields; more than one of them is an error."""
    given: list[tuple[str, dict[str, Any]]] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif response_format.json_schema is None:
            raise InvalidRequestError("response_format json_schema needs a json_schema: {name, schema}")
        else:
            schema = response_format.json_schema.schema_
            strict = response_format.json_schema.strict is not False
            given.append(("response_format", {"json": strict_schema(schema) if strict else schema}))
    if request.structured_outputs is not None:
        fields = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        given.append(("structured_outputs", {k: v for k, v in fields.items() if v is not False}))
    legacy = {
        "json": request.guided_json,
        "regex": request.guided_regex,
        "choice": request.guided_choice,
        "grammar": request.guided_grammar,
    }
    given += [(f"guided_{k}", {k: v}) for k, v in legacy.items() if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(
            f"send one way of structuring the output, got {[name for name, _ in given]}"
        )
    return StructuredOutputsParams(**given[0][1])


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
        self.check_model(request.model)
        if not 1 <= request.n <= self.max_n:
            raise InvalidRequestError(f"n must be between 1 and {self.max_n}, got {request.n}")
        if isinstance(request, ChatCompletionRequest):
            return self._prepare_chat(request)
        return self._prepare_completion(request)

    def check_model(self, model: str | None) -> None:
        names = {self.model_name, *self.model_names}
        if model is not None and model not in names:
            raise ModelNotFoundError(f"model {model!r} does not exist; this server serves {sorted(names)}")

    def _sampling_params(
        self,
        request: GenerationRequest,
        max_tokens: int | None,
        logprobs: int | None,
        structured: StructuredOutputsParams | None,
        prompt_logprobs: int | None,
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
            logit_bias=request.logit_bias or None,
            structured_outputs=structured,
            prompt_logprobs=prompt_logprobs,
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
        _unsupported(request.best_of not in (None, 1), "best_of is not supported; use n")
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("prompt must not be empty")
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:  # the echoed prompt's tokens carry logprobs too
            prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
        structured = _structured_outputs(request, None)
        params = self._sampling_params(
            request, request.max_tokens, request.logprobs, structured, prompt_logprobs
        )
        echo = (
            [p if isinstance(p, str) else self.engine.tokenizer.decode(p) for p in prompts]
            if request.echo
            else None
        )
        return Prepared(request, prompts, params, COMPLETIONS, echo, decode=self.engine.tokenizer.decode)

    def _prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        _unsupported(
            request.top_logprobs is not None and not request.logprobs, "top_logprobs needs logprobs: true"
        )
        messages = request.messages
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        if not conversations or any(not conv for conv in conversations):
            raise InvalidRequestError("messages must not be empty")
        tools = self._tool_plan(request)
        prompts: list[str | list[int]] = [
            self._render_chat(conv, request.add_generation_prompt, tools, request.chat_template_kwargs)
            for conv in conversations
        ]
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = (
            request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        )
        structured = _structured_outputs(request, request.response_format)
        params = self._sampling_params(request, max_tokens, logprobs, structured, request.prompt_logprobs)
        parser = None
        if tools is not None:
            params = self._with_tools(params, tools, structured)
            parser = ToolParser(tools.syntax, self.engine.tokenizer)
        return Prepared(request, prompts, params, CHAT, tools=tools, parser=parser)

    @staticmethod
    def _with_tools(
        params: SamplingParams, tools: ToolPlan, structured: StructuredOutputsParams | None
    ) -> SamplingParams:
        """The request's params with its tools' grammar (one grammar: calls, or an answer in the schema of
        response_format when it has one) and the format's end-of-calls tokens as stops."""
        answer = None
        if structured is not None:
            _unsupported(
                structured.json is None and not structured.json_object,
                f"tools go together with a JSON schema or JSON object answer, not a {structured.kind}",
            )
            answer = {"type": "object"} if structured.json_object else structured.schema()
        grammar = StructuredOutputsParams(grammar=tools.grammar(answer))
        stops = [t for t in tools.syntax.stop_ids if t not in params.stop_token_ids]
        return replace(params, structured_outputs=grammar, stop_token_ids=params.stop_token_ids + stops)

    @functools.cached_property
    def tool_syntax(self) -> ToolSyntax:
        return ToolSyntax.for_tokenizer(self.engine.tokenizer)

    def _tool_plan(self, request: ChatCompletionRequest) -> ToolPlan | None:
        choice = request.tool_choice or ("auto" if request.tools else "none")
        if choice == "none":
            return None
        if not request.tools:
            raise InvalidRequestError(
                f"tool_choice {_choice_name(choice)!r} needs tools; send tools or drop it"
            )
        names = [t.function.name for t in request.tools]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools {names}"
            )
        return ToolPlan(request.tools, choice, request.parallel_tool_calls, self.tool_syntax)

    def _render_chat(
        self,
        conversation: list,
        add_generation_prompt: bool,
        tools: ToolPlan | None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        messages = []
        for m in conversation:
            message = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                kinds = {part.type for part in m.content}
                _unsupported(
                    kinds - set(TEXT_PARTS), f"only text content parts are supported, got {sorted(kinds)}"
                )
                message["content"] = "".join(part.text or "" for part in m.content)
            messages.append(message)
        self.engine.check_prompt_length(sum(len(m.get("content") or "") for m in messages))
        if tools is not None:
            messages = tools.messages(messages)
        else:
            messages = conversation_for_template(messages, self.tool_syntax)
        return self.engine.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools.template_tools() if tools else None,
            template_kwargs=template_kwargs,
        )

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequestError("send exactly one of prompt or messages")
        if request.messages is not None:
            tokens = self._render_chat(request.messages, request.add_generation_prompt, None)
        else:
            text = check_text(request.prompt or "", "the prompt")
            self.engine.check_prompt_length(len(text))
            tokens = self.engine.tokenizer.encode(
                text, add_special_tokens=request.add_special_tokens is not False
            )
        return TokenizeResponse(count=len(tokens), max_model_len=self.engine.max_model_len, tokens=tokens)

    def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self.engine.tokenizer
        special = {
            name: str(getattr(tokenizer, name)) if getattr(tokenizer, name, None) is not None else None
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        added = {
            str(i): {"content": t.content, "special": t.special}
            for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        }
        return {
            "tokenizer_class": type(tokenizer).__name__,
            **special,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": self.engine.max_model_len,
            "vocab_size": len(tokenizer),
            "added_tokens_decoder": added,
        }

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        vocab, limit = len(self.engine.tokenizer), self.engine.max_model_len
        if len(request.tokens) > limit:
            raise InvalidRequestError(
                f"{len(request.tokens)} tokens are more than the context (max_model_len) of {limit}; send fewer"
            )
        if any(not 0 <= t < vocab for t in request.tokens):
            raise InvalidRequestError(f"tokens must be token ids in [0, {vocab})")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(request.tokens))

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

    async def chunks(
        self, prepared: Prepared, request_id: str, priority: int, observer: OutputObserver | None = None
    ) -> AsyncIterator[CompletionResponse | ChatCompletionChunk]:
        """The streaming chunks of a request, then one with the usage alone."""
        chunks = _Chunker(prepared, request_id, self.model_name)
        async with aclosing(self.outputs(prepared, request_id, priority, observer)) as events:
            async for i, out in events:
                chunk = chunks.chunk(i, out)
                if chunk is not None:
                    yield chunk
        yield chunks.usage_chunk()

    async def stream(
        self, prepared: Prepared, request_id: str, priority: int, observer: OutputObserver | None = None
    ) -> AsyncIterator[str]:
        """Server-sent events for a streaming request, ending with `data: [DONE]`.

        An error before the first event is raised; after it, it is sent as an error event.
        """
        sent = False
        include_usage = prepared.request.stream_options and prepared.request.stream_options.include_usage
        try:
            async with aclosing(self.chunks(prepared, request_id, priority, observer)) as chunks:
                async for chunk in chunks:
                    if chunk.choices or include_usage:
                        sent = True
                        yield f"data: {chunk.model_dump_json()}\n\n"
        except ShoalError as e:
            if not sent:
                raise
            yield f"data: {json.dumps(error_body(str(e)))}\n\n"
        yield "data: [DONE]\n\n"


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False
    text_offset: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    tool_stream: ToolCallStream | None = None
    reasoning: list[str] = field(default_factory=list)
    num_reasoning_tokens: int = 0  # the first token_ids that are the thinking's
    seen_tokens: int = 0  # streaming: output tokens seen so far

    def take_prompt(self, out: RequestOutput) -> None:
        self.prompt_token_ids = out.prompt_token_ids
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs


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
            state.reasoning, state.num_reasoning_tokens = [c.reasoning_content or ""], c.num_reasoning_tokens
            state.finish_reason = c.finish_reason
            state.take_prompt(out)

    def response(self, request_id: str, model: str) -> CompletionResponse | ChatCompletionResponse:
        p = self.prepared
        choices = [p.route.final_choice(p, k, state) for k, state in enumerate(self.choices)]
        extra = {}
        if p.route is CHAT and p.params.prompt_logprobs is not None and self.choices:
            extra["prompt_logprobs"] = _prompt_logprobs(self.choices[0].prompt_logprobs)
        return p.route.response(
            id=request_id, model=model, choices=choices, usage=self.usage.usage(), **extra
        )


class _Chunker:
    """Turns delta outputs into streaming chunk JSON."""

    def __init__(self, prepared: Prepared, request_id: str, model: str) -> None:
        self.prepared = prepared
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.choices = [_ChoiceState() for _ in range(len(prepared.prompts) * prepared.params.n)]
        self.usage = _Usage()

    def chunk(self, i: int, out: RequestOutput) -> CompletionResponse | ChatCompletionChunk | None:
        self.usage.add(i, out)
        choices = [c for c in (self._choice(i, out, o) for o in out.outputs) if c is not None]
        if not choices:
            return None
        return self.prepared.route.chunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices
        )

    def _choice(
        self, i: int, out: RequestOutput, o: CompletionOutput
    ) -> CompletionChoice | ChatChunkChoice | None:
        k = self.prepared.choice_index(i, o.index)
        state = self.choices[k]
        if state.started and not (o.text or o.token_ids or o.finish_reason):
            return None
        if not state.started:
            state.take_prompt(out)
        choice = self.prepared.route.delta_choice(self.prepared, i, k, state, o)
        state.started = state.started or choice is not None
        return choice

    def usage_chunk(self) -> CompletionResponse | ChatCompletionChunk:
        route = self.prepared.route
        return route.chunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=self.usage.usage()
        )


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
        pairs = _echoed(p, s) + list(zip(s.token_ids, s.logprobs, strict=False))
        return CompletionChoice(
            index=k,
            text=prefix + "".join(s.text),
            logprobs=_completion_logprobs(pairs, p.params.logprobs, 0, p.decode),
            finish_reason=s.finish_reason,
            prompt_logprobs=self._prompt_logprobs(p, s),
        )

    def delta_choice(
        self, p: Prepared, i: int, k: int, state: _ChoiceState, o: CompletionOutput
    ) -> CompletionChoice:
        first = not state.started
        text = o.text if not first or not p.echo else p.echo[i] + o.text
        pairs = (_echoed(p, state) if first else []) + list(zip(o.token_ids, o.logprobs or [], strict=False))
        logprobs = _completion_logprobs(pairs, p.params.logprobs, state.text_offset, p.decode)
        state.text_offset += len(text)
        return CompletionChoice(
            index=k,
            text=text,
            logprobs=logprobs,
            finish_reason=o.finish_reason,
            prompt_logprobs=self._prompt_logprobs(p, state) if first else None,
        )

    @staticmethod
    def _prompt_logprobs(p: Prepared, s: _ChoiceState) -> PromptLogprobs | None:
        return _prompt_logprobs(s.prompt_logprobs) if p.request.prompt_logprobs is not None else None


def _echoed(p: Prepared, s: _ChoiceState) -> list[tuple[int, TokenLogprobs | None]]:
    """With echo and logprobs, the prompt's tokens come first in logprobs (the first one has none)."""
    if not p.echo or p.params.logprobs is None or s.prompt_logprobs is None:
        return []
    return list(zip(s.prompt_token_ids, s.prompt_logprobs, strict=False))


def _prompt_logprobs(entries: list[TokenLogprobs | None] | None) -> PromptLogprobs | None:
    if entries is None:
        return None
    return [
        None
        if e is None
        else {
            t: PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token)
            for t, lp in e.items()
        }
        for e in entries
    ]


class _ChatRoute(_Route):
    id_prefix, response, chunk = "chatcmpl-", ChatCompletionResponse, ChatCompletionChunk

    def final_choice(self, p: Prepared, k: int, s: _ChoiceState) -> ChatChoice:
        content: str | None = "".join(s.text)
        calls: list[ToolCall] = []
        if p.parser is not None:
            content, calls = p.parser.parse(s.token_ids[s.num_reasoning_tokens :])
        message = ChatResponseMessage(
            content=content, reasoning_content="".join(s.reasoning) or None, tool_calls=calls or None
        )
        return ChatChoice(
            index=k,
            message=message,
            logprobs=_chat_logprobs(s.token_ids, s.logprobs, p.params.logprobs),
            finish_reason="tool_calls" if calls and s.finish_reason == "stop" else s.finish_reason,
        )

    def delta_choice(
        self, p: Prepared, i: int, k: int, state: _ChoiceState, o: CompletionOutput
    ) -> ChatChunkChoice | None:
        content, calls, finish = o.text, None, o.finish_reason
        seen, state.seen_tokens = state.seen_tokens, state.seen_tokens + len(o.token_ids)
        if p.parser is not None:
            stream = state.tool_stream = state.tool_stream or ToolCallStream(p.parser)
            answer_ids = o.token_ids[max(0, o.num_reasoning_tokens - seen) :]
            content, new = stream.add(o.text, answer_ids, finished=o.finish_reason is not None)
            calls = [_call_delta(index, call) for index, call in new] or None
            if stream.calls and finish == "stop":
                finish = "tool_calls"
        logprobs = _chat_logprobs(o.token_ids, o.logprobs or [], p.params.logprobs)
        thinking = o.reasoning_content
        if state.started and not (content or thinking or calls or finish or logprobs):
            return None  # nothing to say: a call being held back, or text held for a stop string
        role = None if state.started else "assistant"
        delta = ChatDelta(role=role, content=content, reasoning_content=thinking, tool_calls=calls)
        return ChatChunkChoice(index=k, delta=delta, logprobs=logprobs, finish_reason=finish)


def _call_delta(index: int, call: ToolCall) -> ToolCallDelta:
    function = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
    return ToolCallDelta(index=index, id=call.id, type="function", function=function)


COMPLETIONS, CHAT = _CompletionsRoute(), _ChatRoute()


def _ranked(entry: TokenLogprobs, k: int) -> list[tuple[int, Any]]:
    return sorted(((tid, lp) for tid, lp in entry.items() if lp.rank <= k), key=lambda x: x[1].rank)[:k]


def _completion_logprobs(
    pairs: list[tuple[int, TokenLogprobs | None]],
    k: int | None,
    offset: int,
    decode: Callable[[list[int]], str] | None,
) -> CompletionLogprobs | None:
    """OpenAI's completions logprobs of (token id, its entry) pairs; an entry is None for the first prompt
    token, which has no logprob."""
    if k is None:
        return None
    result = CompletionLogprobs()
    for tid, entry in pairs:
        chosen = entry.get(tid) if entry is not None else None
        token = chosen.decoded_token if chosen else decode([tid]) if decode else ""
        result.tokens.append(token)
        result.token_logprobs.append(chosen.logprob if chosen else None)
        result.top_logprobs.append(
            {lp.decoded_token: lp.logprob for _, lp in _ranked(entry, k)} if k and entry is not None else None
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
