"""The sampler on one row of logits: the filters keep what they should, and draws follow the distribution."""

import pytest
import torch

from shoal.runner.sampler import SampleRequest, sample_row
from shoal.sampling_params import SamplingParams

VOCAB = 300


def logits_row() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 2


def expected(params: SamplingParams) -> torch.Tensor:
    """The filtered distribution, computed the slow way: sort everything."""
    probs = torch.softmax(logits_row().double() / params.temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[order[: params.top_k or VOCAB]] = True
    probs = torch.where(keep, probs, 0.0)
    if params.top_p < 1:
        sorted_probs = probs[order]
        before = sorted_probs.cumsum(0) - sorted_probs
        keep[order[before > params.top_p * probs.sum()]] = False
        probs = torch.where(keep, probs, 0.0)
    probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def draw_many(params: SamplingParams, count: int) -> torch.Tensor:
    request = SampleRequest(params, torch.Generator().manual_seed(7), [1], [], [])
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for _ in range(count):
        counts[sample_row(logits_row(), request).token_id] += 1
    return counts / count


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.3, top_p=0.9),  # a nucleus wider than the first guess of 64 tokens
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, min_p=0.1),
    ],
    ids=["temperature", "top-k", "top-p", "wide-top-p", "all", "min-p"],
)
def test_draws_follow_the_filtered_distribution(params):
    want = expected(params)
    got = draw_many(params, 6000)
    assert got[want == 0].sum() == 0  # nothing the filters drop is ever drawn
    assert (got - want).abs().sum() < 0.12  # total variation, well above the ~0.05 of 6000 draws
    assert (got > 0).sum() > 0.6 * (want > 0).sum()  # not stuck on a few tokens


def test_the_same_generator_state_gives_the_same_token():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    tokens = [
        [sample_row(logits_row(), SampleRequest(params, g, [1], [], [])).token_id for _ in range(20)]
        for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))
    ]
    assert tokens[0] == tokens[1] and len(set(tokens[0])) > 3
