"""The OpenAPI document describes the API: every POST with its request body, the answers and the errors each
route sends, correct Allow headers; and schemathesis, driven by the document against a live server, finds no
server error and no answer the document does not describe."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_server_helpers import ServerThread

from shoal.server.app import ServerConfig

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"  # noqa: E501


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
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(server, tmp_path):
    run = subprocess.run(
        [Path(sys.executable).parent / "schemathesis", "run", server.url + "/openapi.json", "--checks", CHECKS,
         "--max-examples", "15", "--seed", "1", "--request-timeout", "60", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:]
