"""The Python API refuses bad input with InvalidRequestError saying what to change, never TypeError & co."""

from __future__ import annotations

import pytest

import shoal
from shoal.errors import InvalidRequestError
from shoal.executor import BatchedExecutor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": 1e-300}, "temperature must be 0 (greedy) or between 0.01"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty must be between 0.01"),
        ({"n": 2.5}, "n must be an integer"),
        ({"n": True}, "n must be an integer"),
        ({"max_tokens": "10"}, "max_tokens must be an integer"),
        ({"seed": 2**70}, "seed must be an integer in [0, 2**63)"),
        ({"seed": -1}, "seed must be an integer in [0, 2**63)"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"stop": ["ok", "\ud800"]}, "lone surrogate"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids must be a list of token ids"),
        ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
    ],
)
def test_sampling_params_refuse_bad_values(kwargs, words):
    with pytest.raises(InvalidRequestError, match=_literal(words)):
        shoal.SamplingParams(**kwargs)


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_sampling_params_take_numpy_numbers():
    np = pytest.importorskip("numpy")
    params = shoal.SamplingParams(n=np.int64(2), temperature=np.float32(0.5), seed=np.int64(3))
    assert (params.n, params.temperature, params.seed) == (2, 0.5, 3)
    assert type(params.n) is int and type(params.seed) is int


@pytest.fixture(scope="module")
def llm(model) -> shoal.LLM:
    return shoal.LLM(model, kv_cache_memory=16 << 20, max_model_len=256)


@pytest.mark.parametrize(
    ("prompts", "words"),
    [
        (None, "prompts must be a string"),
        (5, "prompts must be a string"),
        ([None], "a prompt must be a string or a list of token ids"),
        ([[1, True]], "a prompt must be a string or a list of token ids"),
        (["fine", "\ud800"], "the prompt is not valid Unicode"),
        ("x" * 2_000_000, "shorten the prompt"),
    ],
)
def test_generate_refuses_bad_prompts(llm, prompts, words):
    with pytest.raises(InvalidRequestError, match=_literal(words)):
        llm.generate(prompts, shoal.SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing was queued


def test_generate_refuses_params_of_the_wrong_kind(llm):
    with pytest.raises(InvalidRequestError, match="sampling_params must be a SamplingParams"):
        llm.generate(["a", "b"], [{"temperature": 0}, {"temperature": 0}], use_tqdm=False)


def test_executor_refuses_bad_seeds_and_damaged_state(model):
    executor = BatchedExecutor(model, kv_cache_memory=16 << 20, block_size=16)
    for seed in (2**70, -3, 1.5):
        with pytest.raises(InvalidRequestError, match=_literal("seed must be an integer in [0, 2**63)")):
            executor.create(seed=seed)
    conv = executor.create(seed=7)
    conv.prompt([1, 2, 3, 4, 5])
    executor.infer()
    with pytest.raises(InvalidRequestError, match="seed must be"):
        conv.fork(seed=2**64)
    state = conv.save()
    for damaged in (state[: len(state) // 2], state[:-3], b"\x00" * 7, state[:8] + b"[" + state[9:]):
        with pytest.raises(InvalidRequestError):
            executor.load(damaged)
    assert executor.load(state).seq.token_ids == conv.seq.token_ids  # the whole state still loads
