"""What one hostile request can send (issue 17's findings): grammars that cannot work, odd numbers and keys,
/tokenize floods. Each is a clear 400 for that request, never a 500 or an empty "success", and nothing it
leaves behind (a cached grammar) changes the next request."""

from __future__ import annotations

import json

import httpx
import pytest
from test_server_helpers import ServerThread, batch_lines, read_jsonl, wait_until

from shoal.server.app import ServerConfig

SELF_REF = {"$ref": "#"}
CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
RECURSIVE = {
    "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
    "$ref": "#/$defs/n",
}
BAD_GRAMMARS = [
    {"structured_outputs": {"regex": "b{999999}"}},
    {"structured_outputs": {"json": SELF_REF}},
    {"structured_outputs": {"json": CYCLE}},
    {"structured_outputs": {"json": RECURSIVE}},
    {"structured_outputs": {"json": "{"}},
    {"guided_json": "{"},
]


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("data"))
    with ServerThread(tiny_dirs["llama"], config, max_num_seqs=8) as s:
        yield s


def post(server, body: dict, route: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


@pytest.mark.parametrize("extra", BAD_GRAMMARS, ids=lambda e: json.dumps(e)[:40])
def test_a_grammar_that_cannot_work_is_a_400_every_time(server, extra):
    for _ in range(2):  # the second time too: nothing failed was cached
        answer = post(server, {"prompt": "Answer:", "max_tokens": 8, **extra})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["message"].startswith("structured outputs json is a string") or (
            "structured output" in answer.json()["error"]["message"]
        )
    fine = post(server, {"prompt": "Answer:", "max_tokens": 4, "structured_outputs": {"regex": "[ab]{3}"}})
    assert fine.status_code == 200 and len(fine.json()["choices"][0]["text"]) == 3


def test_a_grammar_that_fails_while_generating_fails_its_request_alone(server):
    # the first token is a free choice (so compiling passes), the lexer blows up right after it
    body = {"prompt": "Answer:", "max_tokens": 8, "structured_outputs": {"regex": "(a|c)b{999999}"}}
    for _ in range(2):
        answer = post(server, body)
        assert answer.status_code == 400 and "structured output" in answer.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code in (200, 400)
    if r.status_code == 200:  # failed after the first event: an error event, then the end
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    assert post(server, {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_constrained_answer_cut_by_a_stop_is_an_error_not_a_success(server):
    body = {
        "prompt": "Answer:",
        "max_tokens": 30,
        "structured_outputs": {"regex": "x[ab]{20}"},
        "stop": ["x"],
    }
    answer = post(server, {**body, "include_stop_str_in_output": False})
    assert answer.status_code == 400 and "stopped before it matched" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"logit_bias": {"²": 1}},
        {"logit_bias": {"--5": 1}},
        {"logit_bias": {"-5": 1}},
        {"stop_token_ids": [-5]},
        {"stop_token_ids": [10**6]},
        {"priority": 1e30},
        {"priority": 2**40},
        {"priority": 1.5},
    ],
    ids=lambda e: json.dumps(e),
)
def test_odd_numbers_and_keys_are_400s(server, extra):
    answer = post(server, {"prompt": "Hi", "max_tokens": 2, **extra})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"]


def test_the_batch_api_gives_bad_grammar_lines_a_400(server):
    lines = batch_lines(2)
    lines[0]["body"].update(structured_outputs={"json": SELF_REF})
    lines[1]["body"].update(logit_bias={"²": 3})
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = httpx.post(
        server.url + "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}, timeout=30
    ).json()
    batch = httpx.post(
        server.url + "/v1/batches",
        json={"input_file_id": upload["id"], "endpoint": "/v1/completions", "completion_window": "24h"},
    ).json()
    done = wait_until(
        lambda: (
            (b := httpx.get(f"{server.url}/v1/batches/{batch['id']}").json())["status"] == "completed" and b
        ),
        timeout=60,
    )
    errors = read_jsonl(httpx.get(f"{server.url}/v1/files/{done['error_file_id']}/content").text)
    assert sorted(r["response"]["status_code"] for r in errors) == [400, 400]
    assert all("internal" not in json.dumps(r) for r in errors)


def test_tokenize_is_bounded_like_generation(server):
    huge = "word " * 400_000  # 2 MB: no tokenizing needed to know it cannot fit a 256-token context
    answer = httpx.post(server.url + "/tokenize", json={"prompt": huge}, timeout=60)
    assert answer.status_code == 400 and "characters" in answer.json()["error"]["message"]
    chat = httpx.post(
        server.url + "/tokenize", json={"messages": [{"role": "user", "content": huge}]}, timeout=60
    )
    assert chat.status_code == 400
    many = httpx.post(server.url + "/detokenize", json={"tokens": [5] * 100_000}, timeout=60)
    assert many.status_code == 400 and "context" in many.json()["error"]["message"]
    assert httpx.post(server.url + "/tokenize", json={"prompt": "Hello"}).json()["count"] > 0
