"""The OpenAI-compatible routes, driven by the official `openai` client against a real server on 127.0.0.1."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server_helpers import ServerThread, make_model, metric

from shoal.server.app import ServerConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_model(tmp_path_factory.mktemp("model"))
    with ServerThread(model, ServerConfig(model_names=("tiny",))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completions_list_of_prompts(client):
    prompts = ["The quick brown fox", "Hello, world!", "Once upon a time"]
    resp = client.completions.create(
        model="tiny-llama", prompt=prompts, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 15 and resp.usage.prompt_tokens > 0
    # Each prompt alone gives the same text as in the batch (greedy, batch-invariant engine).
    for prompt, choice in zip(prompts, resp.choices, strict=True):
        alone = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        assert alone.choices[0].text == choice.text


def test_completions_token_ids_n_echo_and_logprobs(client):
    resp = client.completions.create(
        model="tiny",
        prompt=[[5, 6, 7], [8, 9]],
        max_tokens=3,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert len(resp.choices) == 4 and resp.usage.prompt_tokens == 5 and resp.usage.completion_tokens == 12
    echo = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("Hello")
    lp = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=3, logprobs=2, temperature=0, extra_body={"ignore_eos": True}
    )
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and len(logprobs.token_logprobs) == 3
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert all(v <= 0 for v in logprobs.token_logprobs)


def test_seed_makes_sampling_repeatable(client):
    kwargs = {
        "model": "tiny",
        "prompt": "Once",
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 1234,
        "extra_body": {"ignore_eos": True},
    }
    assert (
        client.completions.create(**kwargs).choices[0].text
        == client.completions.create(**kwargs).choices[0].text
    )


def test_stop_strings_and_priority(client):
    resp = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "priority": -5},
    )
    text = resp.choices[0].text
    assert len(text) > 0
    stop = text[len(text) // 2 :][:2] or text
    cut = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=4,
        temperature=0,
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and isinstance(resp.choices[0].message.content, str)
    assert resp.usage.prompt_tokens > 5


def test_chat_list_of_conversations_is_one_batch(client):
    conversations = [[{"role": "user", "content": f"Question {i}"}] for i in range(4)]
    resp = client.chat.completions.create(
        model="tiny", messages=conversations, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    single = client.chat.completions.create(
        model="tiny", messages=conversations[2], max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert single.choices[0].message.content == resp.choices[2].message.content


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)


def test_streaming_completion_with_usage(client):
    full = client.completions.create(
        model="tiny", prompt=["Hello", "World"], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = client.completions.create(
        model="tiny",
        prompt=["Hello", "World"],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
        usage = chunk.usage or usage
    assert texts == [c.text for c in full.choices]
    assert finish == ["length", "length"]
    assert usage is not None and usage.completion_tokens == 12


def test_streaming_chat(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == full.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, stream=False)
    text = httpx.get(server.url + "/metrics").text
    for name in [
        "shoal_num_requests_running", "shoal_num_requests_waiting", "shoal_kv_cache_usage_perc", "shoal_prompt_tokens_total",
        "shoal_generation_tokens_total", "shoal_num_preemptions_total", "shoal_time_to_first_token_seconds_bucket",
        "shoal_inter_token_latency_seconds_bucket",
    ]:  # fmt: skip
        assert name in text, name
    assert metric(text, "shoal_time_to_first_token_seconds_count") >= 1
    assert metric(text, "shoal_generation_tokens_total") > 0


def test_a_non_streaming_request_is_timed_like_a_streamed_one(server, client):
    """Non-streaming answers come from the engine whole (no deltas), yet TTFT and inter-token gaps count."""
    before = httpx.get(server.url + "/metrics").text
    client.completions.create(
        model="tiny", prompt=["One", "Two"], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    after = httpx.get(server.url + "/metrics").text
    delta = {m: metric(after, m) - metric(before, m) for m in
             ("shoal_time_to_first_token_seconds_count", "shoal_inter_token_latency_seconds_count")}  # fmt: skip
    assert delta == {
        "shoal_time_to_first_token_seconds_count": 2,
        "shoal_inter_token_latency_seconds_count": 10,
    }
    assert metric(after, "shoal_server_waiting_sequences") == 0
