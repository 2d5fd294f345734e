"""`shoal batch` and the resumable JSONL runner under it: exactly-once answers across crashes and re-runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_server_helpers import REPO, batch_lines, make_model, read_jsonl, wait_until, write_jsonl

from shoal import AsyncLLM
from shoal.server.batch_jobs import drop_torn_tail, local_answerer, run_file, scan_done
from shoal.server.serving import OpenAIServing


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), context=4096)


def run_offline(model: str, input_path: Path, output: Path, errors: Path | None = None):
    async def main():
        engine = AsyncLLM(model=model, kv_cache_memory=32 << 20)
        try:
            return await run_file(
                local_answerer(OpenAIServing(engine)),
                input_path,
                output,
                errors,
                concurrency=8,
                show_progress=False,
            )
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_drop_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    drop_torn_tail(path)
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text('{"c": ')
    drop_torn_tail(path)
    assert path.read_text() == ""


def test_run_resume_and_bad_lines(model, tmp_path):
    lines = batch_lines(6, max_tokens=5) + batch_lines(2, max_tokens=3, url="/v1/chat/completions")
    lines[6]["custom_id"], lines[7]["custom_id"] = "chat-0", "chat-1"
    bad = [
        "not json",
        {"custom_id": "req-0", "method": "POST", "url": "/v1/completions", "body": {"prompt": "dup"}},
    ]
    bad.append(
        {"custom_id": "long", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x " * 5000}}
    )
    input_path = write_jsonl(tmp_path / "in.jsonl", lines[:4] + bad + lines[4:])
    output = tmp_path / "out.jsonl"

    # A crash left two answers and half a line behind: the re-run keeps those, redoes the rest, once each.
    full = run_offline(model, input_path, tmp_path / "reference.jsonl")
    assert (full.completed, full.failed, full.total) == (8, 3, 11)
    reference = read_jsonl(tmp_path / "reference.jsonl")
    kept = [r for r in reference if r["custom_id"] in ("req-1", "chat-0")]
    output.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "batch_req_torn", "cust')

    progress = run_offline(model, input_path, output)
    assert (progress.skipped, progress.completed, progress.failed) == (2, 8, 3)
    records = read_jsonl(output)
    keys = Counter(
        r["custom_id"] if (r["error"] or {}).get("line") is None else f"line {r['error']['line']}"
        for r in records
    )
    assert set(keys.values()) == {1} and len(keys) == 11
    by_id = {r["custom_id"]: r for r in records if r["response"]}
    assert [by_id[r["custom_id"]] for r in kept] == kept  # not redone (answers finish in any order)
    assert by_id["long"]["response"]["status_code"] == 400
    assert "shorten the prompt" in by_id["long"]["response"]["body"]["error"]["message"]
    # Greedy answers do not depend on which run (or batch) produced them.
    ref = {
        r["custom_id"]: r["response"]["body"]["choices"]
        for r in reference
        if r["response"] and r["response"]["status_code"] == 200
    }
    assert {k: r["response"]["body"]["choices"] for k, r in by_id.items() if k in ref} == ref

    again = run_offline(model, input_path, output)
    assert again.skipped == 11 and read_jsonl(output) == records


def test_separate_error_file(model, tmp_path):
    input_path = write_jsonl(tmp_path / "in.jsonl", batch_lines(2, max_tokens=2) + ["{broken"])
    run_offline(model, input_path, tmp_path / "out.jsonl", tmp_path / "errors.jsonl")
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2
    assert read_jsonl(tmp_path / "errors.jsonl")[0]["error"]["code"] == "invalid_json"
    done = scan_done([tmp_path / "out.jsonl", tmp_path / "errors.jsonl"])
    assert (done.completed, done.failed, done.lines) == (2, 1, {3})


def _cli(model: str, input_path: Path, output: Path) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "shoal.server.cli",
        "batch",
        str(input_path),
        "-o",
        str(output),
        "--model",
        model,
    ]
    args += ["--concurrency", "2", "--max-num-seqs", "2", "--kv-cache-memory", "32MB"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _lines_in(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_cli_resumes_after_kill(model, tmp_path, sig):
    lines = batch_lines(16, max_tokens=150)
    input_path, output = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    first = _cli(model, input_path, output)
    wait_until(lambda: _lines_in(output) >= 3, timeout=120, interval=0.05)
    first.send_signal(sig)
    _, err = first.communicate(timeout=60)
    assert _lines_in(output) < 16, "the run finished before it was stopped"
    if sig == signal.SIGINT:
        assert first.returncode == 130 and "run the same command again to resume" in err

    second = _cli(model, input_path, output)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "16/16 lines answered: 16 ok, 0 failed" in err and "by an earlier run" in err
    records = read_jsonl(output)
    assert Counter(r["custom_id"] for r in records) == Counter(line["custom_id"] for line in lines)
    assert all(r["response"]["status_code"] == 200 for r in records)
