"""Every Python snippet of the README runs as pasted, on the default model: the library ones as they are, the
server ones (and the curl examples) against a live server, with only its address changed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import needs_smollm2
from test_server_helpers import ServerThread

from shoal.server.app import ServerConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PYTHON = re.findall(r"^```python\n(.*?)^```", README, re.DOTALL | re.MULTILINE)
BASH = re.findall(r"^```bash\n(.*?)^```", README, re.DOTALL | re.MULTILINE)
README_URL = "http://127.0.0.1:8000"
SERVER_SNIPPETS = [s for s in PYTHON if "client" in s]
LIBRARY_SNIPPETS = [s for s in PYTHON if "client" not in s]
CURL = next(s for s in BASH if s.startswith("curl"))

pytestmark = [needs_smollm2, pytest.mark.slow]


def test_the_snippets_are_found():
    assert len(PYTHON) >= 12 and len(SERVER_SNIPPETS) == 6 and "-N" in CURL
    assert all(README_URL in s for s in SERVER_SNIPPETS if "OpenAI(" in s)


@pytest.mark.parametrize("index", range(len(LIBRARY_SNIPPETS)))
def test_library_snippet_runs_as_pasted(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(LIBRARY_SNIPPETS[index], f"README snippet {index}", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert printed.strip(), "the snippet printed nothing"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("data"))
    with ServerThread(None, config, kv_cache_memory=64 << 20) as s:
        yield s


def test_server_snippets_run_as_pasted_in_order(server, capsys):
    namespace: dict = {
        "__name__": "__main__"
    }  # later snippets use the client of the first, as a reader would
    for i, snippet in enumerate(SERVER_SNIPPETS):
        code = snippet.replace(README_URL, server.url)
        exec(compile(code, f"README server snippet {i}", "exec"), namespace)
        printed = capsys.readouterr().out
        assert printed.strip(), f"server snippet {i} printed nothing"
    assert sorted(re.findall(r"^(q\d) ", printed, re.MULTILINE)) == ["q0", "q1", "q2"]  # every batch answer


def test_curl_examples_run_as_pasted(server):
    result = subprocess.run(
        ["bash", "-c", "set -e\n" + CURL.replace(README_URL, server.url)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count('"chat.completion"') == 1 and out.count('"text_completion"') == 1
    assert out.rstrip().endswith("data: [DONE]") and '"usage"' in out.rsplit("data:", 2)[1]
