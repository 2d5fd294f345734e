"""Constrained decoding with llguidance: a request's structured-output spec compiled once (off the engine
thread, cached by its grammar text) into a matcher, one matcher per sample, and each step's token masks for
all constrained rows filled together. A mask depends only on that sample's own tokens, so a constrained
request gives the same tokens alone or inside any batch."""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from shoal.errors import GrammarError, InvalidRequestError
from shoal.sampling_params import StructuredOutputsParams

_CACHE_SIZE = 256
EXERCISE_STEPS = 16  # forced tokens walked through when a grammar is compiled, to find its failures early


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for a spec (exactly one of its fields is set)."""
    if spec.json is not None:
        return _from_schema(spec.schema())
    if spec.json_object:
        return _from_schema({"type": "object"})
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    grammar = spec.grammar or ""
    if "::=" in grammar:  # GBNF (llama.cpp's grammar format)
        try:
            grammar = gbnf_to_lark(grammar)
        except Exception as e:  # its parser raises several kinds
            raise InvalidRequestError(f"the structured output grammar is not valid GBNF: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(grammar)


_SUBSCHEMA = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_schema(schema: Any) -> Any:
    """The schema with additionalProperties false on every object schema that does not say otherwise (what
    OpenAI's strict mode, xgrammar's default and the openai client's pydantic parsing expect). Only schema
    keywords are walked: values inside const, enum, default or examples are data and stay as they are."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(result.get(key), dict):
            result[key] = strict_schema(result[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(result.get(key), list):
            result[key] = [strict_schema(s) for s in result[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(result.get(key), dict):
            result[key] = {name: strict_schema(s) for name, s in result[key].items()}
    is_object = result.get("type") == "object" or (
        isinstance(result.get("type"), list) and "object" in result["type"]
    )
    if (is_object or "properties" in result) and "additionalProperties" not in result:
        result["additionalProperties"] = False
    return result


# One way to write the JSON (json.dumps' separators, no other whitespace): models cannot wander in whitespace.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _from_schema(schema: Any) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as e:
        raise InvalidRequestError(f"the JSON schema is not valid: {e}") from None


class GrammarCompiler:
    """Compiles specs for one tokenizer, keeping the last compiled matchers by grammar text. Thread-safe:
    requests are compiled on worker threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:  # ~0.3 s for a 50k vocab: built on first use
        return llguidance.hf.from_tokenizer(
            self._hf_tokenizer,
            n_vocab=tokenizer_vocab(self._hf_tokenizer, self.vocab_size),
            eos_token=self._eos or None,
        )

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the spec's grammar. The grammar is built and exercised here, off
        the engine thread: its first mask, and the tokens it forces after that (up to EXERCISE_STEPS), so its
        first-use cost is paid before the request joins a batch and a grammar that fails early is refused.
        Raises GrammarError (an InvalidRequestError) naming the problem; nothing that failed is cached."""
        text = grammar_text(spec)
        with self._lock:
            template = self._cache.get(text)
            if template is not None:
                self._cache.move_to_end(text)
                return template.deep_copy()
        error = llguidance.LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise GrammarError(f"the structured output {spec.kind} is not valid: {error.strip()}")
        template = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(f"the structured output {spec.kind} is not valid: {template.get_error()}")
        self._exercise(template.deep_copy(), spec)
        with self._lock:
            self._cache[text] = template
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return template.deep_copy()

    def _exercise(self, matcher: llguidance.LLMatcher, spec: StructuredOutputsParams) -> None:
        bitmask = llguidance.torch.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        for _ in range(EXERCISE_STEPS):
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            allowed = np.flatnonzero(np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little"))
            no_text = "NoExtensionBias" in (matcher.get_error() or "")  # nothing can ever be written
            if matcher.is_error() and not no_text:
                raise GrammarError(f"the structured output {spec.kind} cannot be used: {_reason(matcher)}")
            if no_text or len(allowed) == 0 or (matcher.is_stopped() and not matcher.is_accepting()):
                raise GrammarError(
                    f"the structured output {spec.kind} matches no text (a schema that only refers to itself?); "
                    "send one that some text matches"
                )
            if len(allowed) != 1 or int(allowed[0]) in self._eos:
                return  # the model has a choice here: exercised enough
            if not matcher.consume_token(int(allowed[0])):
                raise GrammarError(f"the structured output {spec.kind} cannot be used: {_reason(matcher)}")

    def forget(self, spec: StructuredOutputsParams) -> None:
        """Drop a grammar that failed during generation from the cache (its next use compiles it anew)."""
        text = grammar_text(spec)
        with self._lock:
            self._cache.pop(text, None)


def grammar_failure(matcher: Any) -> GrammarError | None:
    """The error of a matcher that failed during generation, as the request's error (None if it did not)."""
    if matcher is None or not matcher.is_error():
        return None
    return GrammarError(f"the structured output failed during generation: {_reason(matcher)}")


def _reason(matcher: llguidance.LLMatcher) -> str:
    """llguidance's error, without the parser state it dumps after it."""
    error = matcher.get_error() or "unknown error"
    lines = [line for line in error.splitlines() if line.startswith(("Error:", "Stop:"))]
    return "; ".join(lines) or error.splitlines()[0]


def tokenizer_vocab(tokenizer: Any, model_vocab: int) -> int:
    """The ids a grammar must know: the model's logits, and any token the tokenizer has past them (a GGUF
    tokenizer may add one the embedding does not have; the model can never produce it)."""
    return max(model_vocab, len(tokenizer))


@dataclass
class MaskFiller:
    """Fills the allowed-token masks of a step's constrained rows.

    With cores to spare beyond the forward pass's threads, llguidance's thread pool fills them all at once
    on a worker thread while the forward pass runs. Without (every core runs the forward pass), they are
    filled one after the other on the engine thread once it is done: a pool competing with the forward pass
    for the cores slows the whole batch more than the masks cost (measured on 2 cores: batch throughput
    0.86 of unconstrained with the pool, 0.90 without)."""

    vocab_size: int  # the model's: masks are cut to its logits
    spare_threads: int = 0
    width: int = 0  # the tokenizer's vocabulary, when larger (see tokenizer_vocab)

    def __post_init__(self) -> None:
        self.overlaps = self.spare_threads > 0
        self._executor = llguidance.LLExecutor(num_threads=self.spare_threads) if self.overlaps else None
        self._thread = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-masks") if self.overlaps else None
        )

    def start(self, matchers: list[llguidance.LLMatcher]) -> Future:
        """masks() on the worker thread (llguidance releases the GIL), to overlap a forward pass."""
        assert self._thread is not None, "start() needs spare threads"
        return self._thread.submit(self.masks, matchers)

    def masks(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), vocab] bool: True where the token is allowed next."""
        bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), max(self.width, self.vocab_size))
        try:
            if self._executor is None:
                raise RuntimeError("no pool")  # one after the other, below
            llguidance.torch.fill_next_token_bitmask_par(
                self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask
            )
        except Exception:
            for i, matcher in enumerate(matchers):
                try:
                    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, i)
                except Exception:  # its row stays empty; the matcher's error fails its request alone
                    bitmask[i] = 0
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, : self.vocab_size].view(np.bool_))
