"""Turns each sequence's logits row into its next token, using only that row, its params and its generator."""

from __future__ import annotations

import math
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
    allowed: torch.Tensor | None = None  # [vocab] bool: the tokens a structured output allows next


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None
    rank: int | None
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob), best first


def adjust_logits(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
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
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if req.block_eos:
        logits[req.block_eos] = float("-inf")
    if req.allowed is not None:
        logits.masked_fill_(~req.allowed, float("-inf"))
    return logits


NUCLEUS_GUESSES = (64, 1024)  # top-p looks for its nucleus among this many best tokens before sorting all


def candidates(probs: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens that top-k, then top-p, then min-p keep from one row of probabilities: (their probabilities,
    their token ids), or (all probabilities, None) when no filter is set."""
    ids = None
    if p.top_k and p.top_k < probs.shape[0]:
        probs, ids = torch.topk(probs, p.top_k)
    if p.top_p < 1.0:
        threshold = p.top_p * float(probs.sum())
        if ids is None:
            probs, ids = best_covering(probs, threshold)
        before = probs.cumsum(0) - probs
        keep = int((before <= threshold).sum())
        probs, ids = probs[:keep], ids[:keep]
    if p.min_p > 0:
        keep = probs >= p.min_p * probs.max()
        probs, ids = probs[keep], keep.nonzero().squeeze(1) if ids is None else ids[keep]
    return probs, ids


def best_covering(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best tokens, best first: enough of them to hold more than `mass` (sorting the whole row only when
    the best 1024 do not)."""
    for guess in NUCLEUS_GUESSES:
        values, ids = torch.topk(probs, min(guess, probs.shape[0]))
        if float(values.sum()) > mass:
            return values, ids
    return torch.sort(probs, descending=True)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Index of one draw from unnormalized probabilities: one uniform number against their running sum."""
    cdf = probs.double().cumsum(0)
    if not 0 < float(cdf[-1]) < math.inf:
        raise ValueError(
            f"cannot sample: the probabilities sum to {float(cdf[-1])} (NaN or infinite logits?)"
        )
    u = torch.rand(1, dtype=torch.float64, generator=generator) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)


def sample_row(logits: torch.Tensor, req: SampleRequest) -> SampleResult:
    """logits: [vocab] float32, this sequence's own row."""
    p = req.params
    raw = logits
    logits = adjust_logits(logits.clone(), req) if _adjusts_logits(req) else logits
    if p.greedy:
        token = int(torch.argmax(logits))
    else:
        probs, ids = candidates(torch.softmax(logits / p.temperature, dim=-1), p)
        index = draw(probs, req.generator)
        token = index if ids is None else int(ids[index])
    if p.logprobs is None:
        return SampleResult(token, None, None, None)
    return ranked(torch.log_softmax(raw, dim=-1), token, p.logprobs)


def ranked(logprobs: torch.Tensor, token: int, k: int) -> SampleResult:
    """`token`'s logprob and rank in a log-softmax row, with the row's top k."""
    top = torch.topk(logprobs, k) if k else None
    top_list = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    rank = int((logprobs > logprobs[token]).sum()) + 1
    return SampleResult(token, float(logprobs[token]), rank, top_list)


def ranked_rows(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[SampleResult]:
    """ranked() for many rows at once (prompt logprobs): [R, vocab] log-softmax rows, [R] tokens."""
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    values = chosen[:, 0].tolist()
    if k:
        top = torch.topk(logprobs, k, dim=1)
        tops = [
            list(zip(i, v, strict=True))
            for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
    else:
        tops = [[] for _ in values]
    ids = tokens.tolist()
    return [SampleResult(t, v, r, top) for t, v, r, top in zip(ids, values, ranks, tops, strict=True)]


def _adjusts_logits(req: SampleRequest) -> bool:
    p = req.params
    return (
        p.repetition_penalty != 1.0
        or bool(p.presence_penalty)
        or bool(p.frequency_penalty)
        or bool(req.block_eos)
        or bool(p.logit_bias)
        or req.allowed is not None
    )


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> list[SampleResult]:
    """logits: [R, vocab]; one request per row. Greedy rows without extras take a batched argmax."""
    logits = logits.float()
    results: list[SampleResult | None] = [None] * len(requests)
    plain = [
        i
        for i, r in enumerate(requests)
        if r.params.greedy and not _adjusts_logits(r) and r.params.logprobs is None
    ]
    if plain:
        rows = logits if len(plain) == len(requests) else logits[plain]
        tokens = torch.argmax(rows, dim=-1).tolist()
        for i, t in zip(plain, tokens, strict=True):
            results[i] = SampleResult(t, None, None, None)
    for i, req in enumerate(requests):
        if results[i] is None:
            results[i] = sample_row(logits[i], req)
    return results  # type: ignore[return-value]
