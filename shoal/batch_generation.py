"""Batched generation in one call, or one step at a time (as llama-burn users know it).

Sequence i samples with seed + i, so a batch is reproducible for a seed and its sequences differ.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

from shoal.engine.llm_engine import LLMEngine
from shoal.engine.request import OutputKind
from shoal.llm import LLM
from shoal.models.loaded import LoadedModel
from shoal.outputs import RequestOutput
from shoal.sampling_params import SamplingParams

Prompt = str | list[int]
StepToken = tuple[int, str, bool]  # (token id, its text, whether the sequence is done)


def batch_params(
    count: int, max_tokens: int, temperature: float, top_p: float, seed: int, **sampling: Any
) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i, **sampling)
        for i in range(count)
    ]


def generate_batch(
    llm: LLM,
    prompts: Sequence[Prompt],
    max_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    **sampling: Any,
) -> list[str]:
    """Generate for all prompts in one batch; returns the texts in prompt order.

    Extra SamplingParams fields (top_k, stop, ...) pass through. For token ids, logprobs or finish
    reasons, call llm.generate(prompts, batch_params(...)) and read the RequestOutputs.
    """
    params = batch_params(len(prompts), max_tokens, temperature, top_p, seed, **sampling)
    outputs = llm.generate(list(prompts), params, use_tqdm=False)
    return [out.outputs[0].text for out in outputs]


class BatchedGeneration:
    """Step-wise batched generation: each step() gives every active sequence its next token.

    llm: an LLM (its engine is used; run nothing else on it meanwhile), or a LoadedModel / path / None for
    a private engine built with `engine_options`. Extra SamplingParams fields pass through **sampling.
    `active[i]` turns False when sequence i finishes; set it to False yourself to stop it early (its request
    is aborted and its KV freed at the next step). A token's text is what that token released: empty while
    a multi-byte character or a possible stop string is incomplete.
    """

    def __init__(
        self,
        llm: LLM | LoadedModel | str | None,
        prompts: Sequence[Prompt],
        max_tokens: int = 64,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
        engine_options: dict[str, Any] | None = None,
        **sampling: Any,
    ):
        self.engine: LLMEngine = (
            llm.engine if isinstance(llm, LLM) else LLMEngine.from_options(llm, engine_options or {})
        )
        self.tokenizer = self.engine.tokenizer
        count = len(prompts)
        params = batch_params(count, max_tokens, temperature, top_p, seed, **sampling)
        # all valid before any is queued
        inputs = [self.engine.process_input(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        tag = uuid.uuid4().hex[:8]
        self.request_ids = [f"batch-{tag}-{i}" for i in range(count)]
        for rid, processed in zip(self.request_ids, inputs, strict=True):
            self.engine.add_request(processed, None, rid, output_kind=OutputKind.DELTA)
        self._index = {rid: i for i, rid in enumerate(self.request_ids)}
        self.active = [True] * count
        self.token_ids: list[list[int]] = [[] for _ in range(count)]
        self.texts = [""] * count
        self.finish_reasons: list[str | None] = [None] * count
        self._queued: list[deque[StepToken]] = [deque() for _ in range(count)]
        self._running = [True] * count  # its request is still in the engine

    @property
    def done(self) -> bool:
        return not any(self.active)

    def step(self) -> list[StepToken | None]:
        """One token per active sequence (None for inactive ones). Runs engine steps until each active
        sequence has its next token: one step, or a few while long prompts are prefilled in chunks."""
        self._abort_cleared()
        while (
            any(self._waiting(i) for i in range(len(self.active))) and self.engine.has_unfinished_requests()
        ):
            for out in self.engine.step():
                self._collect(out)
        results: list[StepToken | None] = []
        for i, queue in enumerate(self._queued):
            if not self.active[i] or not queue:
                results.append(None)
                continue
            token = queue.popleft()
            self.token_ids[i].append(token[0])
            self.texts[i] += token[1]
            self.active[i] = not token[2]
            results.append(token)
        return results

    def run(self) -> list[str]:
        """Step until every sequence is done; returns the texts."""
        while not self.done:
            self.step()
        return list(self.texts)

    def close(self) -> None:
        """Abort whatever is still running and collect its final outputs."""
        self.active = [False] * len(self.active)
        self._abort_cleared()

    def _waiting(self, i: int) -> bool:
        return self.active[i] and self._running[i] and not self._queued[i]

    def _abort_cleared(self) -> None:
        aborted = False
        for i, rid in enumerate(self.request_ids):
            if not self.active[i] and self._running[i]:
                self.engine.abort_request(rid)
                self._running[i] = False
                aborted = True
        if aborted and not any(self._running):
            for out in self.engine.step():  # hand back the aborted requests' final outputs
                self._collect(out)

    def _collect(self, out: RequestOutput) -> None:
        i = self._index.get(out.request_id)
        if i is None:
            return
        completion = out.outputs[0]
        if out.finished:
            self._running[i] = False
            self.finish_reasons[i] = completion.finish_reason
        if not self.active[i] or not completion.token_ids:
            return
        ids = completion.token_ids
        for j, token in enumerate(ids):
            last = j == len(ids) - 1
            self._queued[i].append((token, completion.text if last else "", last and out.finished))
