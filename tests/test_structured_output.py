"""Structured outputs, logit_bias and prompt logprobs in the library: constrained output always matches its
spec, a constrained request gives the same tokens alone and inside a busy batch, logit_bias moves exactly the
tokens it names, and prompt logprobs equal transformers' log-softmax."""

from __future__ import annotations

import asyncio
import json
import re

import pydantic
import pytest
import torch

import shoal
from shoal import SamplingParams, StructuredOutputsParams
from shoal.errors import InvalidRequestError
from shoal.executor import BatchedExecutor

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["small", "large"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "size", "count"],
    "additionalProperties": False,
}


def check(value: dict) -> None:
    assert set(value) == {"name", "size", "count"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert value["size"] in ("small", "large") and 0 <= value["count"] <= 99


@pytest.fixture(scope="module")
def llm(model) -> shoal.LLM:
    return shoal.LLM(model, kv_cache_memory=32 << 20, max_num_seqs=32)


def texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


def test_json_schema_output_always_matches(llm):
    params = [
        SamplingParams(
            temperature=1.0,
            seed=s,
            max_tokens=80,
            n=2,
            structured_outputs=StructuredOutputsParams(json=SCHEMA),
        )
        for s in range(6)
    ]
    outs = llm.generate(["Describe a box as JSON:"] * 6, params, use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c
            check(json.loads(c.text))


def test_json_object_regex_choice_and_grammar(llm):
    def one(spec: StructuredOutputsParams, seed: int = 0) -> str:
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=60, structured_outputs=spec)
        return llm.generate("Answer:", params, use_tqdm=False)[0].outputs[0].text

    for seed in range(4):
        assert isinstance(json.loads(one(StructuredOutputsParams(json_object=True), seed)), dict)
        assert re.fullmatch(r"[a-c]{2}-\d{3}", one(StructuredOutputsParams(regex=r"[a-c]{2}-\d{3}"), seed))
        assert one(StructuredOutputsParams(choice=["red", "green", "blue"]), seed) in ("red", "green", "blue")
        lark = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/'
        assert re.fullmatch(r"\(\d(,\d)*\)", one(StructuredOutputsParams(grammar=lark), seed))
        gbnf = 'root ::= "yes" | "no"'
        assert one(StructuredOutputsParams(grammar=gbnf), seed) in ("yes", "no")


def test_a_constrained_request_is_the_same_alone_and_in_a_busy_batch(llm):
    constrained = SamplingParams(
        temperature=0.9, seed=7, max_tokens=80, structured_outputs=StructuredOutputsParams(json=SCHEMA)
    )
    alone = llm.generate(["Describe a box as JSON:"], constrained, use_tqdm=False)[0].outputs[0]
    busy_prompts = [f"Some other text {i}" for i in range(12)]
    busy_params = [SamplingParams(temperature=0.8, seed=i, max_tokens=30, ignore_eos=True) for i in range(12)]
    outs = llm.generate(
        [*busy_prompts[:6], "Describe a box as JSON:", *busy_prompts[6:]],
        [*busy_params[:6], constrained, *busy_params[6:]],
        use_tqdm=False,
    )
    assert outs[6].outputs[0].token_ids == alone.token_ids
    check(json.loads(alone.text))


def test_logit_bias_forces_and_removes_tokens(llm):
    greedy = SamplingParams(temperature=0, max_tokens=4)
    base = llm.generate("The quick brown", greedy, use_tqdm=False)[0].outputs[0].token_ids
    forced = SamplingParams(temperature=0, max_tokens=4, logit_bias={"42": 100})
    assert llm.generate("The quick brown", forced, use_tqdm=False)[0].outputs[0].token_ids == [42] * 4
    removed = SamplingParams(temperature=0, max_tokens=1, logit_bias={base[0]: -100})
    assert llm.generate("The quick brown", removed, use_tqdm=False)[0].outputs[0].token_ids != base[:1]
    with pytest.raises(InvalidRequestError, match="logit_bias values must be numbers in"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(InvalidRequestError, match="below the vocabulary size"):
        llm.generate("x", SamplingParams(logit_bias={10**7: 1}), use_tqdm=False)


def test_prompt_logprobs_match_transformers(llm, tiny_model):
    from transformers import AutoModelForCausalLM

    text = "The quick brown fox jumps over the lazy dog. Hello, world!"
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.double(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for position, entry in enumerate(out.prompt_logprobs[1:], 1):
        token = ids[position]
        assert abs(entry[token].logprob - float(expected[position - 1, token])) < 1e-3
        top = torch.topk(expected[position - 1], 3).indices.tolist()
        assert set(top) <= set(entry)


def test_prompt_logprobs_with_chunked_prefill_and_a_cached_prefix(model):
    llm = shoal.LLM(model, kv_cache_memory=32 << 20, max_num_batched_tokens=8)
    text = "The quick brown fox jumps over the lazy dog. Hello, world!"
    plain = llm.generate(text, SamplingParams(max_tokens=1), use_tqdm=False)  # caches the prefix
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert plain and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    whole = shoal.LLM(model, kv_cache_memory=32 << 20).generate(
        text, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    assert [e and {t: lp.logprob for t, lp in e.items()} for e in out.prompt_logprobs] == [
        e and {t: lp.logprob for t, lp in e.items()} for e in whole.prompt_logprobs
    ]


def test_bad_specs_are_refused_before_anything_is_queued(llm):
    bad = [
        (StructuredOutputsParams(json={"type": "frobnicate"}), "JSON schema is not valid"),
        (StructuredOutputsParams(regex="a(b"), "regex is not valid"),
        (StructuredOutputsParams(grammar="start: undefined_rule"), "grammar is not valid"),
    ]
    for spec, words in bad:
        with pytest.raises(InvalidRequestError, match=words):
            llm.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        StructuredOutputsParams()


def test_the_executor_samples_under_a_structured_output(model):
    executor = BatchedExecutor(model, kv_cache_memory=16 << 20)
    conv = executor.create(seed=3)
    conv.prompt("Answer:")
    params = SamplingParams(temperature=1.0, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{4}"))
    tokens = []
    for _ in range(10):
        executor.infer()
        token = conv.sample(params)
        if token in model.eos_token_ids:
            break
        tokens.append(token)
    assert re.fullmatch(r"[0-9]{4}", model.tokenizer.decode(tokens))


class Box(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    count: int = pydantic.Field(ge=0, le=99)


def test_a_chat_session_returns_a_parsed_object(model):
    async def ask() -> list[Box]:
        async with shoal.Context(model, sequences=4, kv_cache_memory=16 << 20) as context:
            sessions = [shoal.ChatSession(context.get_sequence()) for _ in range(4)]
            return await asyncio.gather(
                *(s.prompt("Describe a box.", max_tokens=60, response_format=Box) for s in sessions)
            )

    boxes = asyncio.run(ask())
    assert len(boxes) == 4 and all(isinstance(b, Box) for b in boxes)


def test_get_tokenizer(llm, model):
    assert llm.get_tokenizer() is model.tokenizer


def test_masks_filled_alongside_the_forward_pass_give_the_same_tokens(model):
    from shoal.engine.structured_output import MaskFiller

    def run(spare: int) -> list[list[int]]:
        llm = shoal.LLM(model, kv_cache_memory=32 << 20)
        llm.engine.core.masks = MaskFiller(model.config.vocab_size, spare_threads=spare)
        assert llm.engine.core.masks.overlaps == (spare > 0)
        params = [
            SamplingParams(
                temperature=1.0,
                seed=s,
                max_tokens=80,
                structured_outputs=StructuredOutputsParams(json=SCHEMA),
            )
            for s in range(4)
        ]
        return [o.outputs[0].token_ids for o in llm.generate(["A box:"] * 4, params, use_tqdm=False)]

    assert run(0) == run(1)
