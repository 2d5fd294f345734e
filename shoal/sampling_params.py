"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import json as json_module
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import InvalidRequestError

MAX_SEED = 1 << 63  # seeds are in [0, MAX_SEED)
_MAX_COUNT = 1 << 31  # the largest token count, top_k or n anyone can mean
MIN_TEMPERATURE = 0.01  # below it (and above 0) logits / temperature can overflow float32
MAX_TEMPERATURE = 100.0
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_INT_FIELDS = ("n", "top_k", "min_tokens", "max_tokens", "logprobs", "prompt_logprobs")
_OPTIONAL_INT_FIELDS = ("max_tokens", "logprobs", "prompt_logprobs")


@dataclass(frozen=True)
class Bound:
    """The values a numeric parameter may take: low..high (low itself excluded when open), and `also`."""

    low: float
    high: float
    rule: str  # the range in words, as error messages state it
    open_low: bool = False
    also: float | None = None

    def __contains__(self, value: float) -> bool:
        above = self.low < value if self.open_low else self.low <= value
        return value == self.also or (above and value <= self.high)

    def json_schema(self) -> dict[str, Any]:
        """The range as JSON Schema keywords, for documents that describe these parameters."""
        limits = {"exclusiveMinimum" if self.open_low else "minimum": self.low, "maximum": self.high}
        return limits if self.also is None else {"anyOf": [{"const": self.also}, limits]}


# Every numeric parameter's range, checked here and stated in the server's OpenAPI document.
BOUNDS: dict[str, Bound] = {
    "n": Bound(1, _MAX_COUNT, "at least 1"),
    "temperature": Bound(
        MIN_TEMPERATURE,
        MAX_TEMPERATURE,
        f"0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}",
        also=0,
    ),
    "top_p": Bound(0, 1, "in (0, 1]", open_low=True),
    "top_k": Bound(-1, _MAX_COUNT, ">= 0 (0 or -1 disables it)"),
    "min_p": Bound(0, 1, "in [0, 1]"),
    "repetition_penalty": Bound(0.01, 100.0, "between 0.01 and 100.0 (1 means none)"),
    "presence_penalty": Bound(-2, 2, "in [-2, 2]"),
    "frequency_penalty": Bound(-2, 2, "in [-2, 2]"),
    "max_tokens": Bound(1, _MAX_COUNT, "at least 1"),
    "min_tokens": Bound(0, _MAX_COUNT, ">= 0"),
    "logprobs": Bound(0, 20, "in [0, 20]"),
    "prompt_logprobs": Bound(0, 20, "in [0, 20]"),
    "seed": Bound(0, MAX_SEED - 1, "an integer in [0, 2**63)"),
    "priority": Bound(-(1 << 31), (1 << 31) - 1, f"an integer in [{-(1 << 31)}, {(1 << 31) - 1}]"),
    "logit_bias": Bound(-100, 100, "numbers in [-100, 100]"),
}
_BOUNDED_FIELDS = (*_FLOAT_FIELDS, *_INT_FIELDS)


@dataclass
class StructuredOutputsParams:
    """Constrain the output (vLLM's names); set exactly one. json: a JSON schema (dict or JSON text);
    json_object: any JSON object; regex: a regular expression; choice: one of these strings; grammar: a
    Lark grammar (llguidance's syntax) or a GBNF one (llama.cpp's, recognised by '::=')."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                "structured outputs take exactly one of json, regex, choice, grammar or json_object, "
                f"got {given or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, dict | bool | str):
            raise InvalidRequestError(
                f"structured outputs json must be a JSON schema object, got {self.json!r}"
            )
        self.schema()  # a schema given as JSON text must parse
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"structured outputs {name} must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, list | tuple)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise InvalidRequestError(
                "structured outputs choice must be a non-empty list of non-empty strings"
            )

    def schema(self) -> Any:
        """The JSON schema (parsed when it was given as JSON text); None when this is not a schema spec."""
        if not isinstance(self.json, str):
            return self.json
        try:
            return json_module.loads(self.json)
        except ValueError as e:
            raise InvalidRequestError(
                f"structured outputs json is a string but not JSON ({e}); send the schema as an object"
            ) from None

    @property
    def kind(self) -> str:
        if self.json is not None:
            return "JSON schema"
        return (
            "JSON object"
            if self.json_object
            else "regex"
            if self.regex is not None
            else ("choice" if self.choice is not None else "grammar")
        )


@dataclass
class SamplingParams:
    """How to pick tokens for one request (vLLM-compatible names).

    temperature 0 means greedy. top_k 0 or -1 disables top-k. A request's output depends only on
    its prompt, these parameters and its seed, never on what else shares the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # top-N per prompt token (the first token has none)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _check_types(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL_INT_FIELDS:
                setattr(self, name, _as_int(name, value))
        if self.seed is not None:
            self.seed = check_seed(self.seed)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None and (
            not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops)
        ):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for s in stops or []:
            check_text(s, "a stop string")
        if self.logit_bias is not None:
            self.logit_bias = _as_logit_bias(self.logit_bias)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams")
        ids = self.stop_token_ids
        if ids is not None and (
            not isinstance(ids, list | tuple) or not all(_is_int(t) and t >= 0 for t in ids)
        ):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}"
            )

    def _validate(self) -> None:
        for name in _BOUNDED_FIELDS:
            value = getattr(self, name)
            if value is not None and value not in BOUNDS[name]:
                raise InvalidRequestError(f"{name} must be {BOUNDS[name].rule}, got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_priority(priority: Any) -> int:
    """A request priority: an integer in the 32-bit range (lower runs first). Raises InvalidRequestError."""
    if not _is_int(priority) or priority not in BOUNDS["priority"]:
        raise InvalidRequestError(f"priority must be {BOUNDS['priority'].rule}, got {priority!r}")
    return int(priority)


def check_seed(seed: Any) -> int:
    """A seed as the engine takes it: an integer in [0, 2**63). Raises InvalidRequestError."""
    if not _is_int(seed) or seed not in BOUNDS["seed"]:
        raise InvalidRequestError(f"seed must be {BOUNDS['seed'].rule}, got {seed!r}")
    return int(seed)


def check_text(text: str, what: str) -> str:
    """`text`, if it can be encoded as UTF-8 (a lone surrogate such as '\\ud800' cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode()
        raise InvalidRequestError(
            f"{what} is not valid Unicode: {bad!r} at character {e.start} is a lone surrogate; send valid UTF-8 text"
        ) from None
    return text


def _as_logit_bias(bias: Any) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {bias!r}")
    result: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not _is_int(token) or token < 0:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (integers >= 0, written in ASCII digits), got {key!r}"
            )
        if not _is_number(value) or value not in BOUNDS["logit_bias"]:
            raise InvalidRequestError(f"logit_bias values must be {BOUNDS['logit_bias'].rule}, got {value!r}")
        result[int(token)] = float(value)
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_int(name: str, value: Any) -> int:
    if not _is_int(value):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    return int(value)
