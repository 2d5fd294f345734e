"""The OpenAPI document describes the API: every POST with its request body, the answers and the errors each
route sends, correct Allow headers; and schemathesis, driven by the document against a live server, finds no
server error and no answer the document does not describe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_server_helpers import ServerThread

from shoal.server.app import ServerConfig

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    with ServerThread(tiny_dirs["llama"], ServerConfig(data_dir=tmp_path_factory.mktemp("data"))) as s:
        yield s


def test_the_document_has_bodies_answers_and_errors(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # never sent: bad input is a 400
            if path.startswith("/v1") or path in ("/tokenize", "/detokenize"):
                assert {"400", "401", "413"} <= set(responses), (method, path)
            if method == "post" and not path.endswith("/cancel"):
                assert "requestBody" in operation, path
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "messages" in doc["components"]["schemas"][body]["properties"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "503" in chat["responses"]


def test_allow_names_every_method_of_a_path(server):
    answer = httpx.request("OPTIONS", server.url + "/v1/batches")
    assert answer.status_code == 405 and set(answer.headers["allow"].split(", ")) == {"GET", "POST"}


@pytest.mark.skipif(
    shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None, reason="schemathesis"
)
def test_schemathesis_default_checks_find_nothing(server, tmp_path):
    """All of schemathesis' default checks: no 5xx, only documented answers, every schema-valid body
    accepted and every schema-violating one refused (the rules no schema can state: schemathesis_hooks)."""
    context = httpx.get(server.url + "/tokenizer_info").json()["model_max_length"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "SHOAL_MAX_MODEL_LEN": str(context),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run(
        [Path(sys.executable).parent / "schemathesis", "--config-file", str(TESTS / "schemathesis.toml"), "run",
         server.url + "/openapi.json", "--max-examples", "15", "--seed", "1", "--request-timeout", "60",
         "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,  # its crash cache stays in tmp_path
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:]


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("max_tokens", 2.0, True),  # an integer, as JSON has it
        ("max_tokens", "2", False),  # text is not a number
        ("max_tokens", 2.5, False),
        ("echo", 0, False),  # a number is not a boolean
        ("temperature", "0.5", False),
        ("best_of", 1, True),
        ("best_of", 2, False),
    ],
)
def test_bodies_are_taken_as_the_document_types_them(server, field, value, accepted):
    answer = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    assert answer.status_code == (200 if accepted else 400), answer.text
    if not accepted:
        assert field in answer.json()["error"]["message"]


def test_the_document_states_the_servers_limits(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    info = httpx.get(server.url + "/tokenizer_info").json()
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    ids = props["stop_token_ids"]["anyOf"][0]["items"]
    assert ids["minimum"] == 0 and ids["maximum"] == info["vocab_size"] - 1
    assert props["max_tokens"]["anyOf"][0]["maximum"] < info["model_max_length"]
    bias = props["logit_bias"]["anyOf"][0]["propertyNames"]["pattern"]
    assert re.fullmatch(bias.strip("^$"), str(info["vocab_size"] - 1))
    assert not re.fullmatch(bias.strip("^$"), str(info["vocab_size"]))
    assert "x-shoal-limit" not in json.dumps(doc)
