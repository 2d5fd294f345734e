"""The engine: add requests, abort them, step. One step = schedule -> one forward pass -> sample -> report."""

from __future__ import annotations

import functools
import logging
import random
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import torch

from shoal.config import EngineConfig
from shoal.core.sequence import Sequence
from shoal.engine.core import EngineCore, resolve_model
from shoal.engine.request import OutputKind, Request
from shoal.engine.structured_output import grammar_failure
from shoal.errors import GrammarError, InvalidRequestError
from shoal.models.loaded import LoadedModel
from shoal.outputs import RequestOutput
from shoal.runner.sampler import SampleRequest, ranked_rows, sample, sample_row
from shoal.sampling_params import SamplingParams, check_priority, check_text

logger = logging.getLogger("shoal")


@dataclass(frozen=True)
class ProcessedInput:
    """A request's input after processing: its text (None for token ids), token ids, complete parameters."""

    text: str | None
    token_ids: list[int]
    params: SamplingParams
    matcher: Any = None  # the compiled structured output, at its start


@dataclass
class PendingMasks:
    """Structured-output masks being filled on a worker thread, one row per sequence."""

    seqs: list[Sequence]
    future: Future

    def result(self) -> dict[Sequence, torch.Tensor]:
        masks = self.future.result()
        return {seq: masks[row] for row, seq in enumerate(self.seqs)}


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions_total: int
    num_requests_finished_total: int


class LLMEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig):
        self.model = model
        self.config = config
        self.tokenizer = model.tokenizer
        self.core = EngineCore(model, config)
        self.max_model_len = self.core.max_model_len
        self.block_manager = self.core.block_manager
        self.scheduler = self.core.scheduler
        self.requests: dict[str, Request] = {}
        self._seq_owner: dict[Sequence, tuple[Request, int]] = {}
        self._finished_outputs: list[RequestOutput] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished_total = 0
        # Logprob entries name their tokens: each token id is decoded once.
        self.token_text = functools.lru_cache(maxsize=1 << 17)(lambda t: self.tokenizer.decode([t]))

    @classmethod
    def from_options(cls, model: str | LoadedModel | None, options: dict[str, Any]) -> LLMEngine:
        """An engine over a loaded model (loading it first when given a path or None)."""
        config = EngineConfig.from_options(options)
        return cls(resolve_model(model, config), config)

    # -- admission ----------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            check_text(prompt, "the prompt")
            self.check_prompt_length(len(prompt))
            return prompt, self.model.chat_template.encode_rendered(prompt)
        if not isinstance(prompt, list | tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise InvalidRequestError(
                f"a prompt must be a string or a list of token ids (integers), got {type(prompt).__name__}"
            )
        return None, list(prompt)

    def check_prompt_length(self, characters: int) -> None:
        """Refuse a prompt of this many characters if it cannot fit the context whatever its tokens, before it
        is tokenized (or rendered)."""
        fewest_tokens = characters // (2 * self.model.max_token_chars)  # 2x margin for normalizers
        if fewest_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {characters} characters, at least {fewest_tokens} tokens, but the context "
                f"(max_model_len) is {self.max_model_len}: shorten the prompt"
            )

    def process_input(self, prompt: str | list[int], params: SamplingParams | None = None) -> ProcessedInput:
        """Tokenize, check and fill in defaults, once per request. Raises InvalidRequestError."""
        text, ids = self.tokenize(prompt)
        params = self.validate(ids, params or SamplingParams())
        spec = params.structured_outputs
        return ProcessedInput(text, ids, params, self.core.grammars.compile(spec) if spec else None)

    def add_request(
        self,
        prompt: str | list[int] | ProcessedInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.FINAL,
    ) -> str:
        """Queue a request (a ProcessedInput is taken as it is; params are then ignored). Raises
        InvalidRequestError, with nothing queued, if it can never be served."""
        request_id = request_id or uuid.uuid4().hex
        check_priority(priority)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not isinstance(prompt, ProcessedInput):
            prompt = self.process_input(prompt, params)
        text, ids, params = prompt.text, prompt.token_ids, prompt.params
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(1 << 63)
        req = Request(
            request_id,
            text,
            ids,
            params,
            priority,
            output_kind,
            self.tokenizer,
            set() if params.ignore_eos else self.model.eos_token_ids,
            seed,
            matcher=prompt.matcher,
            reasoning_tokens=self.model.reasoning_tokens,
            token_text=self.token_text,
        )
        seq = Sequence(f"{request_id}#0", list(ids), len(ids), params, priority)
        req.new_sample(0, seq)
        self.requests[request_id] = req
        self._seq_owner[seq] = (req, 0)
        self.scheduler.add(seq)
        return request_id

    def validate(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        """Check a tokenized request; returns params with max_tokens filled in. Raises InvalidRequestError."""
        vocab = self.model.config.vocab_size
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise InvalidRequestError(
                f"stop_token_ids must be below the vocabulary size {vocab}, got {max(params.stop_token_ids)}"
            )
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(
                f"logit_bias token ids must be below the vocabulary size {vocab}, got {max(params.logit_bias)}"
            )
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the context (max_model_len) is {limit}: shorten the "
                f"prompt to at most {limit - 1} tokens, or raise max_model_len if the model allows it"
            )
        if params.max_tokens is None:
            params = replace(params, max_tokens=limit - len(ids))
        if len(ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}, {len(ids) + params.max_tokens} "
                f"in all, over the context (max_model_len) of {limit}: lower max_tokens to at most {limit - len(ids)}"
            )
        needed = self.block_manager.blocks_needed(len(ids) + params.max_tokens)
        if needed > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"this request needs {needed} KV blocks ({len(ids)} prompt + {params.max_tokens} max_tokens) but the "
                f"whole KV pool has {self.block_manager.num_blocks}: raise kv_cache_memory or lower max_tokens"
            )
        return params

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s in req.samples:
            if not s.seq.is_finished:
                s.seq.finish_reason = s.seq.finish_reason or "abort"
                self.scheduler.remove(s.seq)
            self._seq_owner.pop(s.seq, None)
        while len(req.samples) < req.params.n:  # samples never forked still report as aborted
            ghost = Sequence(
                f"{request_id}#{len(req.samples)}",
                list(req.prompt_token_ids),
                len(req.prompt_token_ids),
                req.params,
            )
            ghost.finish_reason = "abort"
            self.scheduler.remove(ghost)
            req.new_sample(len(req.samples), ghost)
        out = req.make_output()
        if out is not None:
            self._finished_outputs.append(out)

    # -- stepping -----------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished_outputs)

    def step(self) -> list[RequestOutput]:
        outputs, self._finished_outputs = self._finished_outputs, []
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        masks = self._start_masks(plan.scheduled)  # filled while the forward pass runs
        step = self.core.forward(plan.scheduled, plan.copies)
        logits, owners = step.logits, step.owners
        for index, (first, rows) in step.prompt.items():
            self._record_prompt_logprobs(plan.scheduled[index][0], first, rows)
        for seq, n in plan.scheduled:
            if seq.num_output_tokens == 0 and seq.num_computed_tokens <= seq.num_prompt_tokens:
                self.prompt_tokens_total += n
        touched: dict[str, Request] = {}
        targets = [self._seq_owner[plan.scheduled[i][0]] for i in owners]
        results = self._sample(logits, targets, masks)
        for row, ((req, i), result) in enumerate(zip(targets, results, strict=True)):
            if req.request_id not in self.requests:
                continue  # failed earlier in this step
            try:
                failure = grammar_failure(req.samples[i].constraint)
                if failure is not None:
                    raise failure
                if result is None:
                    raise RuntimeError("sampling failed")
                if i == 0 and len(req.samples) < req.params.n:
                    self._fork_samples(req, logits[row])
                self._record(req, i, result)
                touched[req.request_id] = req
            except Exception as exc:
                touched.pop(req.request_id, None)
                outputs.append(self._fail(req, exc))
        for req in touched.values():
            out = req.make_output()
            if out is not None:
                outputs.append(out)
            if req.finished:
                self.requests.pop(req.request_id, None)
                self.requests_finished_total += 1
                for s in req.samples:
                    self._seq_owner.pop(s.seq, None)
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, first: int, rows: torch.Tensor) -> None:
        owner = self._seq_owner.get(seq)
        if owner is None or owner[1] != 0:
            return
        req = owner[0]
        logprobs = torch.log_softmax(rows.float(), dim=-1)
        targets = torch.tensor(seq.token_ids[first : first + rows.shape[0]], dtype=torch.long)
        results = ranked_rows(logprobs, targets, req.params.prompt_logprobs or 0)
        req.add_prompt_logprobs(first, [req.logprob_entry(r) for r in results])

    def _start_masks(self, scheduled: list[tuple[Sequence, int]]) -> PendingMasks | None:
        """Start filling the masks of the constrained sequences that sample after this step's forward pass
        (those whose last token it computes), when there are cores to do it alongside: a mask depends only
        on tokens already sampled."""
        if not self.core.masks.overlaps:
            return None
        seqs = [
            seq
            for seq, n in scheduled
            if seq.num_computed_tokens + n == seq.num_tokens and self._matcher(seq) is not None
        ]
        if not seqs:
            return None
        return PendingMasks(seqs, self.core.masks.start([self._matcher(seq) for seq in seqs]))

    def _matcher(self, seq: Sequence) -> Any:
        owner = self._seq_owner.get(seq)
        return owner[0].samples[owner[1]].constraint if owner is not None else None

    def _sample_requests(
        self, targets: list[tuple[Request, int]], pending: PendingMasks | None = None
    ) -> list[SampleRequest]:
        """Each row's sampling request; the rows of structured outputs get their masks (filled together)."""
        samples = [req.samples[i] for req, i in targets]
        requests = [req.sample_request(s) for (req, _), s in zip(targets, samples, strict=True)]
        masks = pending.result() if pending is not None else {}
        missing = [s for s in samples if s.constraint is not None and s.seq not in masks]
        if missing:
            filled = self.core.masks.masks([s.constraint for s in missing])
            masks.update(zip([s.seq for s in missing], filled, strict=True))
        for request, s in zip(requests, samples, strict=True):
            request.allowed = masks.get(s.seq)
            if request.allowed is not None and s.may_open_thinking:  # the answer may begin by thinking
                request.allowed = request.allowed.clone()
                request.allowed[s.reasoning.tokens.start_id] = True
        return requests

    def _sample(
        self, logits: torch.Tensor, targets: list[tuple[Request, int]], masks: PendingMasks | None = None
    ) -> list:
        """Sample every row; if that fails, row by row so one bad request cannot sink the others."""
        requests = self._sample_requests(targets, masks)
        try:
            return sample(logits, requests)
        except Exception:
            results = []
            for row, request in enumerate(requests):
                try:
                    results.append(sample_row(logits[row].float(), request))
                except Exception:
                    logger.exception("sampling failed for one request")
                    results.append(None)
            return results

    def _fail(self, req: Request, exc: Exception) -> RequestOutput:
        """End one request with an error; the rest of the batch goes on. A request error (a grammar that failed
        while generating) is reported as the client's; its grammar leaves the cache."""
        invalid = isinstance(exc, InvalidRequestError)
        if isinstance(exc, GrammarError) and req.params.structured_outputs is not None:
            self.core.grammars.forget(req.params.structured_outputs)
        if invalid:
            logger.info("request %s failed: %s", req.request_id, exc)
        else:
            logger.exception("request %s failed", req.request_id, exc_info=exc)
        self.abort_request(req.request_id)
        out = self._finished_outputs.pop() if self._finished_outputs else req.make_output()
        out.error = str(exc) if invalid else f"{type(exc).__name__}: {exc}"
        out.error_is_invalid_request = invalid
        return out

    def _record(self, req: Request, index: int, result) -> None:
        """The request decides whether the sample is done (validate() keeps max_tokens within the context)."""
        sample_ = req.samples[index]
        req.record(sample_, result)
        self.generation_tokens_total += 1
        if sample_.seq.finish_reason is not None:
            self.scheduler.remove(sample_.seq)

    def _fork_samples(self, req: Request, logits_row: torch.Tensor) -> None:
        """Samples 1..n-1 share the prompt's blocks with sample 0 and draw their first token from the same logits."""
        parent = req.samples[0].seq
        for index in range(1, req.params.n):
            child = Sequence(
                f"{req.request_id}#{index}",
                list(parent.token_ids),
                parent.num_prompt_tokens,
                req.params,
                req.priority,
                arrival=parent.arrival,
            )
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
            req.new_sample(index, child)
            self._seq_owner[child] = (req, index)
            (request,) = self._sample_requests([(req, index)])
            self._record(req, index, sample_row(logits_row.clone(), request))

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions,
            num_requests_finished_total=self.requests_finished_total,
        )
