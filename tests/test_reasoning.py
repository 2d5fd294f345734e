"""Reasoning models: a tiny model whose tokenizer has <think> and </think> and whose template opens the
thinking in the generation prompt (as DeepSeek-R1's and Qwen3's do). The thinking comes apart from the answer,
streamed and not, in the library and through the server; a structured output constrains only the answer."""

from __future__ import annotations

import json

import openai
import pytest
from test_server_helpers import ServerThread
from tiny_models import make_family_tokenizer, make_tiny_hf_model

import shoal

TOKENIZER = make_family_tokenizer("qwen3-thinking")
END = TOKENIZER.convert_tokens_to_ids("</think>")
START = TOKENIZER.convert_tokens_to_ids("<think>")
SOON = {str(END): 6}  # ends the thinking after a few tokens of a random model
ASK = [{"role": "user", "content": "Is Paris in France?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(
        "qwen3", tmp_path_factory.mktemp("r1") / "tiny-r1", tokenizer=TOKENIZER, context=2048
    )


@pytest.fixture(scope="module")
def client(model_dir):
    with ServerThread(model_dir, max_num_seqs=8) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def ask(client, stream: bool, **kwargs):
    kwargs = {"model": "tiny-r1", "messages": ASK, "max_tokens": 24, "logit_bias": SOON, **kwargs}
    if not stream:
        message = client.chat.completions.create(**kwargs).choices[0].message
        return message.content or "", getattr(message, "reasoning_content", None) or ""
    content, thinking = [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            content.append(choice.delta.content or "")
            thinking.append(
                getattr(choice.delta, "reasoning_content", None) or extra.get("reasoning_content") or ""
            )
    return "".join(content), "".join(thinking)


def test_thinking_and_answer_come_apart_streamed_and_not(client):
    thought = 0
    for seed in range(4):
        content, thinking = ask(client, False, seed=seed, temperature=1.0)
        assert (
            "<think>" not in thinking and "</think>" not in thinking
        )  # the split is exact: see the library test
        assert ask(client, True, seed=seed, temperature=1.0) == (content, thinking)
        thought += bool(thinking)
    assert thought  # some answers did think first


def test_a_constrained_answer_follows_the_thinking(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    for seed in range(3):
        chat = client.chat.completions.create(
            model="tiny-r1", messages=ASK, max_tokens=200, logit_bias=SOON, seed=seed, temperature=1.0,
            response_format=response_format,
        )  # fmt: skip
        message = chat.choices[0].message
        assert json.loads(message.content) in ({"ok": True}, {"ok": False}), message
    assert any(
        ask(client, False, seed=s, temperature=1.0, response_format=response_format, max_tokens=200)[1]
        for s in range(3)
    )  # the thinking before it was free text


def test_enable_thinking_false_answers_at_once(client):
    content, thinking = ask(
        client, False, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        logit_bias={str(START): -100},
    )  # fmt: skip
    assert content and not thinking


def test_the_library_reports_the_thinking_apart(model_dir):
    model = shoal.load_model(model_dir)
    llm = shoal.LLM(model, kv_cache_memory=8 << 20)
    params = shoal.SamplingParams(max_tokens=24, temperature=1.0, seed=1, logit_bias={END: 6})
    (out,) = llm.chat(ASK, params, use_tqdm=False)
    completion = out.outputs[0]
    ids = completion.token_ids
    if END in ids:
        cut = ids.index(END)
        assert completion.num_reasoning_tokens == cut + 1
        assert completion.text == TOKENIZER.decode(ids[cut + 1 :], skip_special_tokens=True)
        assert (completion.reasoning_content or "") == TOKENIZER.decode(ids[:cut], skip_special_tokens=True)
    else:
        assert completion.text == "" and completion.num_reasoning_tokens == len(ids)
