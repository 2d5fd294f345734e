"""A user's request: its prompt, parameters and n sample sequences, plus what has been reported of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from shoal.core.sequence import Sequence
from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.structured_output import grammar_failure
from shoal.errors import GrammarError
from shoal.models.reasoning import ReasoningState, ReasoningTokens
from shoal.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from shoal.runner.sampler import SampleRequest, SampleResult
from shoal.sampling_params import SamplingParams


class OutputKind(Enum):
    FINAL = "final"  # one output when the request finishes (offline generate)
    STARTED_AND_FINAL = "started_and_final"  # one at its first token (no text yet), one complete at the end
    CUMULATIVE = "cumulative"  # everything so far, every step
    DELTA = "delta"  # only what is new since the last output (streaming)


def sample_seed(seed: int, index: int) -> int:
    """Sample 0 uses the request's seed itself, so n=1 and the first of n agree."""
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 63)


@dataclass
class Sample:
    """One of the request's n samples: its sequence and what it has produced."""

    index: int
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    logprobs: list[TokenLogprobs] | None
    cumulative_logprob: float | None
    matcher: Any = None  # the structured output's state (an llguidance matcher), None when unconstrained
    reasoning: ReasoningState | None = None  # for a reasoning model: where its thinking is
    thinking_detok: IncrementalDetokenizer | None = None
    sent_tokens: int = 0
    sent_chars: int = 0
    sent_thinking_chars: int = 0
    reported_finish: bool = False

    @property
    def answer_start(self) -> int | None:
        """Where the answer begins in the output ids (None while the model is thinking)."""
        return 0 if self.reasoning is None else self.reasoning.answer_start

    @property
    def constraint(self) -> Any:
        """The matcher that constrains the next token: the structured output applies to the answer only."""
        return self.matcher if self.answer_start is not None else None

    @property
    def may_open_thinking(self) -> bool:
        return self.reasoning is not None and self.reasoning.may_open

    def answer_ids(self) -> list[int]:
        start = self.answer_start
        return [] if start is None else self.seq.output_token_ids[start:]

    def thinking_ids(self) -> list[int]:
        if self.reasoning is None:
            return []
        state, ids = self.reasoning, self.seq.output_token_ids
        if state.end is None:
            return ids[state.start :] if state.thinking else []  # thinking still, or it never thought
        return ids[state.start : state.end]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    output_kind: OutputKind
    tokenizer: Any
    eos_token_ids: set[int]
    seed: int
    samples: list[Sample] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    reported_start: bool = False  # STARTED_AND_FINAL: the first-token output was sent
    matcher: Any = None  # a fresh structured-output matcher; each sample constrains a copy of it
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # one per prompt token; the first is None
    sent_prompt_logprobs: bool = False
    reasoning_tokens: ReasoningTokens | None = None  # the model's <think> markers, for a reasoning model
    token_text: Callable[[int], str] | None = None  # one token decoded (the engine's cached decoder)

    def new_sample(self, index: int, seq: Sequence) -> Sample:
        p = self.params
        generator = None
        if not p.greedy:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, index))
        detok = IncrementalDetokenizer(
            self.tokenizer, p.skip_special_tokens, list(p.stop), p.include_stop_str_in_output
        )
        sample = Sample(
            index,
            seq,
            detok,
            generator,
            [] if p.logprobs is not None else None,
            0.0 if p.logprobs is not None else None,
            self.matcher.deep_copy() if self.matcher is not None else None,
        )
        if self.reasoning_tokens is not None:
            sample.reasoning = ReasoningState.for_prompt(self.reasoning_tokens, self.prompt_token_ids)
            sample.thinking_detok = IncrementalDetokenizer(self.tokenizer, True)
        self.samples.append(sample)
        return sample

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.params.n and all(s.seq.is_finished for s in self.samples)

    def sample_request(self, sample: Sample) -> SampleRequest:
        seq = sample.seq
        blocked: list[int] = []
        if seq.num_output_tokens < self.params.min_tokens:
            blocked = sorted(
                self.params.stop_token_ids + ([] if self.params.ignore_eos else list(self.eos_token_ids))
            )
        return SampleRequest(
            self.params, sample.generator, self.prompt_token_ids, seq.output_token_ids, blocked
        )

    def record(self, sample: Sample, result: SampleResult) -> None:
        """Append a sampled token and its logprobs; decide whether the sample is done."""
        seq = sample.seq
        seq.token_ids.append(result.token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if sample.logprobs is not None:
            sample.logprobs.append(self.logprob_entry(result))
            sample.cumulative_logprob += result.logprob
        answering = sample.answer_start is not None
        if sample.reasoning is not None:
            sample.reasoning.add(seq.output_token_ids)
        stop_str = None if self.decodes_at_end else self._decode_step(sample)
        p, token = self.params, result.token_id
        if stop_str is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_str
        elif not p.ignore_eos and token in self.eos_token_ids and seq.num_output_tokens > p.min_tokens - 1:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids and seq.num_output_tokens > p.min_tokens - 1:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif answering and sample.matcher is not None and self._grammar_done(sample.matcher, token):
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason == "stop" and sample.matcher is not None and not sample.matcher.is_accepting():
            raise GrammarError(
                "the output stopped before it matched its structured output (a stop string or stop token "
                "cut it, or its grammar allows no end): remove the stop, or change the constraint"
            )

    @staticmethod
    def _decode_step(sample: Sample) -> str | None:
        """Decode the newest token into the thinking or the answer; the stop string it completes, if any."""
        state = sample.reasoning
        if state is not None and sample.thinking_detok is not None:
            if state.thinking:
                sample.thinking_detok.add(sample.thinking_ids())
                return None
            if state.end == len(sample.seq.output_token_ids) - 1:  # this token was </think>
                sample.thinking_detok.flush(sample.thinking_ids())
                return None
        return sample.detok.add(sample.answer_ids())

    @staticmethod
    def _grammar_done(matcher: Any, token: int) -> bool:
        """Feed the token to the structured output; True once its grammar is complete."""
        if not matcher.consume_token(token):
            raise grammar_failure(matcher) or GrammarError(f"the structured output refused token {token}")
        return matcher.is_stopped()

    def add_prompt_logprobs(self, first: int, entries: list[TokenLogprobs]) -> None:
        """Logprobs of prompt tokens first, first+1, ...; positions already recorded (a recomputed prompt
        after preemption) are not recorded twice."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
        skip = len(self.prompt_logprobs) - first
        if skip >= 0:
            self.prompt_logprobs.extend(entries[skip:])

    def logprob_entry(self, result: SampleResult) -> TokenLogprobs:
        """token id -> Logprob for the chosen token and the top ones (of a sampled or a prompt token)."""
        text = self.token_text or (lambda t: self.tokenizer.decode([t]))
        entry = {tid: Logprob(lp, rank + 1, text(tid)) for rank, (tid, lp) in enumerate(result.top_logprobs)}
        if result.token_id not in entry:
            entry[result.token_id] = Logprob(result.logprob, result.rank, text(result.token_id))
        return entry

    @property
    def decodes_at_end(self) -> bool:
        """Text is decoded once, at the end, unless it is streamed or stop strings must be watched for."""
        return self.output_kind in (OutputKind.FINAL, OutputKind.STARTED_AND_FINAL) and not self.params.stop

    def make_output(self) -> RequestOutput | None:
        """What to report now under this request's output kind (None: nothing to report)."""
        finished = self.finished
        if self.output_kind == OutputKind.FINAL and not finished:
            return None
        if self.output_kind == OutputKind.STARTED_AND_FINAL and not finished:
            if self.reported_start or self.first_token_time is None:
                return None
            self.reported_start = True
        outputs = [c for c in (self._completion(s) for s in self.samples) if c is not None]
        if not outputs and not finished:
            return None
        first = self.samples[0].seq if self.samples else None
        metrics = {"arrival_time": self.arrival_time}
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not (
            self.output_kind == OutputKind.DELTA and self.sent_prompt_logprobs
        ):
            prompt_logprobs, self.sent_prompt_logprobs = list(self.prompt_logprobs), True
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outputs,
            finished,
            num_cached_tokens=first.num_cached_tokens if first else 0,
            metrics=metrics,
            prompt_logprobs=prompt_logprobs,
        )

    def _completion(self, s: Sample) -> CompletionOutput | None:
        seq = s.seq
        done = seq.finish_reason is not None
        if done:
            whole = (
                self.output_kind == OutputKind.FINAL and not self.params.stop
            )  # never decoded step by step
            s.detok.finish(s.answer_ids(), whole, cut_at_stop=isinstance(seq.stop_reason, str))
            if s.thinking_detok is not None:
                s.thinking_detok.finish(s.thinking_ids(), whole, cut_at_stop=False)
        text = s.detok.stable_text(done)
        thinking = s.thinking_detok.text if s.thinking_detok is not None else ""
        ids = seq.output_token_ids
        num_thinking = s.reasoning.num_tokens(len(ids)) if s.reasoning is not None else 0
        if self.output_kind != OutputKind.DELTA:
            return CompletionOutput(
                s.index,
                text,
                list(ids),
                s.cumulative_logprob,
                list(s.logprobs) if s.logprobs is not None else None,
                seq.finish_reason,
                seq.stop_reason,
                thinking or None,
                num_thinking,
            )
        unchanged = len(text) == s.sent_chars and len(thinking) == s.sent_thinking_chars
        if s.reported_finish or (len(ids) == s.sent_tokens and unchanged and not done):
            return None
        out = CompletionOutput(
            s.index,
            text[s.sent_chars :],
            list(ids[s.sent_tokens :]),
            s.cumulative_logprob,
            s.logprobs[s.sent_tokens :] if s.logprobs is not None else None,
            seq.finish_reason,
            seq.stop_reason,
            thinking[s.sent_thinking_chars :] or None,
            num_thinking,
        )
        s.sent_tokens, s.sent_chars, s.reported_finish = len(ids), len(text), done
        s.sent_thinking_chars = len(thinking)
        return out
