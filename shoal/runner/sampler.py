"""Turns each sequence's logits row into its next token, using only that row, its params and its generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy
    prompt_ids: list[int]
    output_ids: list[int]
    block_eos: list[int]  # token ids forbidden because min_tokens is not reached yet


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None
    rank: int | None
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob), best first


def apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(req.prompt_ids) | set(req.output_ids)), dtype=torch.long, device=logits.device
        )
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_ids:
        ids, counts = torch.tensor(req.output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    if req.block_eos:
        logits[req.block_eos] = float("-inf")
    return logits


def filter_probs(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """top-k, top-p and min-p on one row of probabilities; the rest set to 0."""
    if p.top_k and p.top_k < probs.shape[-1]:
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs
        drop = order[before > p.top_p * sorted_probs.sum()]
        probs = probs.index_fill(0, drop, 0.0)
    if p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    return probs


def sample_row(logits: torch.Tensor, req: SampleRequest) -> SampleResult:
    """logits: [vocab] float32, this sequence's own row."""
    p = req.params
    raw = logits
    logits = apply_penalties(logits.clone(), req) if _needs_penalties(req) else logits
    if p.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = filter_probs(torch.softmax(logits / p.temperature, dim=-1), p)
        token = int(torch.multinomial(probs, 1, generator=req.generator))
    if p.logprobs is None:
        return SampleResult(token, None, None, None)
    logprobs = torch.log_softmax(raw, dim=-1)
    top = torch.topk(logprobs, p.logprobs) if p.logprobs else None
    top_list = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    rank = int((logprobs > logprobs[token]).sum()) + 1
    return SampleResult(token, float(logprobs[token]), rank, top_list)


def _needs_penalties(req: SampleRequest) -> bool:
    p = req.params
    return (
        p.repetition_penalty != 1.0
        or bool(p.presence_penalty)
        or bool(p.frequency_penalty)
        or bool(req.block_eos)
    )


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> list[SampleResult]:
    """logits: [R, vocab]; one request per row. Greedy rows without extras take a batched argmax."""
    logits = logits.float()
    results: list[SampleResult | None] = [None] * len(requests)
    plain = [
        i
        for i, r in enumerate(requests)
        if r.params.greedy and not _needs_penalties(r) and r.params.logprobs is None
    ]
    if plain:
        tokens = torch.argmax(logits[plain], dim=-1).tolist()
        for i, t in zip(plain, tokens, strict=True):
            results[i] = SampleResult(t, None, None, None)
    for i, req in enumerate(requests):
        if results[i] is None:
            results[i] = sample_row(logits[i], req)
    return results  # type: ignore[return-value]
