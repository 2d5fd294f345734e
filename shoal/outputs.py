"""What the engine hands back: one RequestOutput per request, one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str


# One dict per generated token: token id -> Logprob, holding the sampled token and the top-N.
TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One sample of a request. In delta mode (streaming), text/token_ids/logprobs hold only what is new."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # A reasoning model's thinking (<think>...</think>), apart from the answer in `text`; None when it did not
    # think. num_reasoning_tokens: how many of the sample's first output tokens are the thinking's, markers
    # included (in delta outputs too, counted from the start of the output).
    reasoning_content: str | None = None
    num_reasoning_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # set when this request failed inside the engine; other requests go on
    error_is_invalid_request: bool = False  # the failure is the request's own (e.g. its grammar failed)
    metrics: dict[str, float] = field(default_factory=dict)
    # With SamplingParams(prompt_logprobs=k): one entry per prompt token (None for the first), each holding
    # that token and the top k. In streaming (delta) outputs it comes once, with the first output.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
