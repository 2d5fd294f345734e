"""A bounded fuzz of the server: a few hundred malformed bodies and field values, generated from a fixed seed,
against a live server on 127.0.0.1. None may answer 5xx or take more than a few seconds, and afterwards every
KV block is free."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx
import pytest
from test_server_helpers import ServerThread, make_model, metric, wait_until

from shoal.server.app import ServerConfig

CASES = 400
SLOW_S = 5.0

NASTY_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2**31, 2**70, -(2**70), 0.5, -0.5, 1e-300, 1e308, -1e308, 3.7,
    "", "x", "hot", "\ud800", "a\udfffb", "\x00", "🙂" * 50, "lorem " * 20_000, [], {}, [[]], [None], [1, "a"],
    [-5], [10**9], list(range(300)), {"type": "text"}, {"a": {"b": {"c": []}}}, ["\ud800"], [[1, 2], "x"],
]  # fmt: skip
RAW_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "01", "[" * 50 + "]" * 50, '"\\ud800"', "tru"]
FIELDS = [
    "prompt", "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "n", "stop", "stop_token_ids", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "stream", "stream_options",
    "priority", "logit_bias", "logprobs", "top_logprobs", "echo", "suffix", "best_of", "tools", "response_format",
    "add_generation_prompt", "unknown_field",
]  # fmt: skip
MESSAGE_PARTS = ["role", "content", "name", "tool_calls"]
RECURSIVE = {
    "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
    "$ref": "#/$defs/n",
}
# What a hostile client sends (issue 17): each must be a 400 on its own, never a 5xx or an empty success.
HOSTILE = [
    ("structured_outputs", {"regex": "b{999999}"}),
    ("structured_outputs", {"json": {"$ref": "#"}}),
    ("structured_outputs", {"json": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}),
    ("structured_outputs", {"json": RECURSIVE}),
    ("structured_outputs", {"json": "{"}),
    ("guided_json", "{"),
    ("logit_bias", {"²": 1}),
    ("logit_bias", {"--5": 1}),
    ("stop_token_ids", [-5]),
    ("priority", 1e30),
]  # fmt: skip


def base_body(rng: random.Random, url: str) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": rng.choice([1, 2, 4]), "temperature": rng.choice([0, 0.7])}
    if url == "/v1/completions":
        body["prompt"] = rng.choice(["hello", ["a", "b"], [1, 2, 3], [[4, 5], [6]]])
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    if rng.random() < 0.3:
        body["stream"] = True
    return body


def mutate(rng: random.Random, body: dict[str, Any]) -> bytes:
    """One or a few nasty changes to a valid body, then maybe a broken encoding."""
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.random()
        if kind < 0.6:
            body[rng.choice(FIELDS)] = rng.choice(NASTY_VALUES)
        elif kind < 0.75 and isinstance(body.get("messages"), list) and body["messages"]:
            message = body["messages"][0]
            if isinstance(message, dict):
                message[rng.choice(MESSAGE_PARTS)] = rng.choice(
                    [*NASTY_VALUES, "wizard", [{"type": "text", "text": 5}]]
                )
        elif kind < 0.85:
            body.pop(rng.choice(list(body) or ["x"]), None)
        else:
            text = json.dumps(body)
            name = rng.choice(FIELDS)
            return (text[:-1] + f', "{name}": {rng.choice(RAW_VALUES)}}}').encode()
    text = json.dumps(body)
    damage = rng.random()
    if damage < 0.05:
        return text[: rng.randrange(len(text))].encode()  # truncated
    if damage < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))  # noise, maybe not UTF-8
    if damage < 0.1:
        return json.dumps(rng.choice([[], 5, "x", None, [body]])).encode()  # not an object
    return text.encode(errors="surrogatepass")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_model(tmp_path_factory.mktemp("model"))
    config = ServerConfig(max_n=4, data_dir=tmp_path_factory.mktemp("data"))
    with ServerThread(model, config, max_model_len=128, kv_cache_memory=16 << 20) as s:
        yield s


def _send(client: httpx.Client, method: str, url: str, body: bytes | None = None) -> int:
    headers = {"content-type": "application/json"}
    if method == "GET":
        return client.get(url).status_code
    with client.stream(method, url, content=body, headers=headers) as resp:
        for _ in resp.iter_bytes():  # a stream is read to its end
            pass
        return resp.status_code


def test_fuzzed_requests_never_answer_5xx_or_hang(server):
    rng = random.Random(20261202)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for case in range(CASES):
            if case % 10 == 9:  # the other routes too
                method, url, body = rng.choice(
                    [
                        (
                            "POST",
                            "/v1/batches",
                            json.dumps({"input_file_id": rng.choice(NASTY_VALUES[:20])}).encode(),
                        ),
                        (
                            "POST",
                            "/v1/batches",
                            mutate(rng, {"input_file_id": "file-x", "endpoint": "/v1/completions"}),
                        ),
                        (
                            "GET",
                            f"/v1/batches?limit={rng.choice(['abc', '-5', '99999999999999999999', '1'])}",
                            None,
                        ),
                        ("GET", f"/v1/files/{rng.choice(['x', '..%2F..%2Fetc', '%00'])}/content", None),
                        ("POST", "/v1/files", mutate(rng, {"purpose": "batch"})),
                    ]
                )
            else:
                url = rng.choice(["/v1/completions", "/v1/chat/completions"])
                method, body = "POST", mutate(rng, base_body(rng, url))
            start = time.perf_counter()
            status = _send(client, method, url, body)
            elapsed = time.perf_counter() - start
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, f"case {case}: {method} {url} {body[:300] if body else ''!r} -> {status}"
            assert elapsed < SLOW_S, f"case {case}: {method} {url} took {elapsed:.1f}s"
    print(statuses)
    assert statuses.get(400, 0) > CASES // 4 and statuses.get(200, 0) > 10, statuses  # both kinds were tried

    def settled() -> str | None:
        text = httpx.get(server.url + "/metrics").text
        free, total = metric(text, "shoal_kv_cache_free_blocks"), metric(text, "shoal_kv_cache_total_blocks")
        return text if metric(text, "shoal_num_requests_running") == 0 and free == total else None

    text = wait_until(settled, timeout=30)
    assert metric(text, "shoal_server_waiting_sequences") == 0
    assert 'status="500"' not in text


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions"])
def test_hostile_bodies_are_400s_alone(server, url):
    rng = random.Random(17)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for field, value in HOSTILE:
            for stream in (False, True):
                body = {**base_body(rng, url), field: value, "stream": stream}
                status = _send(client, "POST", url, json.dumps(body).encode())
                assert status == 400, f"{field}={value!r} stream={stream} -> {status}"
        long_prompt = {"prompt": "word " * 20, "max_tokens": 1, "prompt_logprobs": 5}  # most of the context
        if url == "/v1/completions":
            assert _send(client, "POST", url, json.dumps(long_prompt).encode()) == 200


def test_a_tokenize_flood_does_not_stall_a_chat(server):
    """8 concurrent 4 MB /tokenize bodies (each refused before it is tokenized) while a chat streams: no gap
    between its chunks reaches 1 s, and the server's memory stays bounded."""
    import concurrent.futures
    import resource

    flood = json.dumps({"prompt": "word " * 800_000}).encode()
    chat = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": True,
    }
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    gaps: list[float] = []

    def stream_chat() -> int:
        last = time.perf_counter()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=60) as response:
            for _ in response.iter_lines():
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            return response.status_code

    with (
        httpx.Client(base_url=server.url, timeout=60) as client,
        concurrent.futures.ThreadPoolExecutor(9) as pool,
    ):
        floods = [pool.submit(_send, client, "POST", "/tokenize", flood) for _ in range(8)]
        assert pool.submit(stream_chat).result() == 200
        assert {f.result() for f in floods} == {400}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    print(f"slowest chunk gap {max(gaps):.3f} s, peak RSS grew {grown / 1024:.0f} MiB")
    assert max(gaps) < 1.0 and grown < 512 * 1024
