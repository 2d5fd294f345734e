"""Bad input, auth, backpressure and client disconnects, over plain HTTP (httpx) against a real server."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from test_server_helpers import ServerThread, make_model, metric, wait_until

from shoal.server.app import ServerConfig

LONG = {"max_tokens": 3000, "temperature": 0, "ignore_eos": True}  # seconds of work, to be cut short


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), context=4096)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, ServerConfig(max_n=4)) as s:
        yield s


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": 123}, ["'prompt' must be a string"]),
        ({"prompt": "hi", "temperature": "hot"}, ["temperature", "valid number"]),
        ({"prompt": "hi", "max_tokens": 0}, ["max_tokens must be at least 1"]),
        ({"prompt": "hi", "n": 5}, ["n must be between 1 and 4"]),
        ({"prompt": "hi " * 5000}, ["context", "shorten the prompt"]),
        ({"prompt": "hi", "max_tokens": 5000}, ["lower max_tokens"]),
        ({"prompt": ""}, ["prompt must not be empty"]),
        ({"prompt": "hi", "top_p": 2}, ["top_p must be in (0, 1]"]),
        ({}, ["'prompt' is required"]),
    ],
)
def test_invalid_completion_requests(server, body, words):
    resp = httpx.post(server.url + "/v1/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = error_of(resp)
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]


def test_an_unknown_model_is_a_404_as_openai_answers_it(server):
    resp = httpx.post(server.url + "/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert resp.status_code == 404, resp.text
    error = error_of(resp)
    assert error["code"] == "model_not_found" and "'gpt-4' does not exist" in error["message"]
    assert "tiny-llama" in error["message"]  # the names served


def test_invalid_stream_request_fails_before_streaming(server):
    resp = httpx.post(server.url + "/v1/completions", json={"prompt": "hi " * 5000, "stream": True})
    assert resp.status_code == 400 and "context" in error_of(resp)["message"]


def test_malformed_json_and_bad_chat(server):
    resp = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400 and "not valid JSON" in error_of(resp)["message"]
    resp = httpx.post(server.url + "/v1/chat/completions", json={"messages": "hello"})
    assert resp.status_code == 400 and "'messages' must be" in error_of(resp)["message"]
    resp = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    )
    assert resp.status_code == 400 and "'tools.0.function' is required" in error_of(resp)["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404


def test_openai_client_sees_bad_request(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=0)


def test_api_key(model):
    with ServerThread(model, ServerConfig(api_key="s3cret")) as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        bad = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and error_of(bad)["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # not under /v1
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_full_queue_answers_503_with_retry_after(model):
    # One sequence at a time: a long request holds the engine, the next waits, the one after is refused.
    with ServerThread(model, ServerConfig(max_waiting=1), max_num_seqs=1) as s:

        async def scenario() -> list[int]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                async with http.stream(
                    "POST", "/v1/completions", json={"prompt": "a", "stream": True, **LONG}
                ) as first:
                    lines = first.aiter_lines()  # keep a reference: dropping it would close the stream
                    await anext(lines)  # it is running now
                    waiting = asyncio.create_task(
                        http.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
                    )
                    while s.app.state.shoal.admission.waiting < 1:  # until the second one is queued
                        await asyncio.sleep(0.01)
                    refused = await http.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
                    assert refused.headers["retry-after"] == "1"
                    assert error_of(refused)["code"] == "overloaded"
                # The long request is gone (its stream closed), so the waiting one runs.
                return [refused.status_code, (await waiting).status_code]

        assert asyncio.run(scenario()) == [503, 200]
        assert metric(httpx.get(s.url + "/metrics").text, "shoal_requests_rejected_total") == 1


def _settled(server: ServerThread) -> str | None:
    text = httpx.get(server.url + "/metrics").text
    running = metric(text, "shoal_num_requests_running")
    free, total = metric(text, "shoal_kv_cache_free_blocks"), metric(text, "shoal_kv_cache_total_blocks")
    return text if running == 0 and free == total else None


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_blocks(server, stream):
    before = wait_until(lambda: _settled(server), timeout=30)
    tokens_before = metric(before, "shoal_generation_tokens_total")
    aborted_before = metric(before, "shoal_requests_aborted_total")
    body = {"prompt": "Once upon a time", "n": 4, "stream": stream, **LONG}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    break  # leave after the first chunk: the connection closes
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.1))
    started = time.monotonic()
    after = wait_until(lambda: _settled(server), timeout=30)
    assert time.monotonic() - started < 5
    generated = metric(after, "shoal_generation_tokens_total") - tokens_before
    assert generated < 4 * 3000, "the request ran to the end instead of being aborted"
    assert metric(after, "shoal_requests_aborted_total") == aborted_before + 1
