"""The self-hosted Batch API through the official `openai` client, crash-resume with kill -9, and SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections import Counter

import httpx
import openai
import pytest
from test_server_helpers import ServerProcess, ServerThread, batch_lines, make_model, read_jsonl, wait_until

from shoal.server.app import ServerConfig
from shoal.server.multipart import save_upload

FINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), context=4096)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("data"), batch_checkpoint_s=0.2)
    with ServerThread(model, config, max_num_seqs=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def upload(client: openai.OpenAI, lines: list) -> str:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    return client.files.create(file=("input.jsonl", data), purpose="batch").id


def wait_final(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> openai.types.Batch:
    return wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in FINAL and b, timeout=timeout, interval=0.1
    )


def test_batch_flow_with_bad_lines(client):
    good = batch_lines(6, max_tokens=4)
    bad = [
        "{not json",
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},  # no custom_id
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {
            "custom_id": "bad-body",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "x", "max_tokens": 0},
        },
        {**good[0], "body": {"prompt": "dup", "max_tokens": 2}},  # duplicate custom_id
    ]
    file_id = upload(client, good[:3] + bad + good[3:])
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h", metadata={"run": "t1"}
    )
    assert batch.status == "validating" and batch.metadata == {"run": "t1"}
    batch = wait_final(client, batch.id)
    assert batch.status == "completed" and batch.completed_at and batch.in_progress_at
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        11,
        6,
        5,
    )

    output = read_jsonl(client.files.content(batch.output_file_id).text)
    assert sorted(r["custom_id"] for r in output) == sorted(line["custom_id"] for line in good)
    for record in output:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4
        assert record["response"]["request_id"] == body["id"]

    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    codes = {(e["error"] or {}).get("code") or e["response"]["status_code"] for e in errors}
    assert codes == {"invalid_json", "missing_custom_id", "invalid_url", 400, "duplicate_custom_id"}
    bad_body = next(e for e in errors if e["custom_id"] == "bad-body")
    assert "max_tokens must be at least 1" in bad_body["response"]["body"]["error"]["message"]

    listed = client.batches.list(limit=10)
    assert batch.id in [b.id for b in listed.data]


def test_chat_batch(client):
    file_id = upload(client, batch_lines(3, max_tokens=3, url="/v1/chat/completions"))
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_final(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3 and batch.error_file_id is None
    output = read_jsonl(client.files.content(batch.output_file_id).text)
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in output)


def test_cancel_batch(client):
    file_id = upload(client, batch_lines(40, max_tokens=1500))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", interval=0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_final(client, batch.id, timeout=30)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts.completed < 40


def test_batch_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="no file"):  # the input file is a resource not found
        client.batches.create(
            input_file_id="file-missing", endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    resp = httpx.post(
        server.url + "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}
    )
    assert resp.status_code == 400 and "purpose must be 'batch'" in resp.json()["error"]["message"]
    resp = httpx.post(server.url + "/v1/batches", json={"input_file_id": "f", "endpoint": "/v1/embeddings"})
    assert resp.status_code == 400 and "endpoint" in resp.json()["error"]["message"]


def test_batch_runs_below_interactive_priority(model, tmp_path):
    # Two sequences at a time and 12 long batch lines queued: an interactive request still goes next.
    config = ServerConfig(data_dir=tmp_path, batch_concurrency=12)
    with ServerThread(model, config, max_num_seqs=2) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        batch = client.batches.create(
            input_file_id=upload(client, batch_lines(12, max_tokens=600)),
            endpoint="/v1/completions",
            completion_window="24h",
        )
        wait_until(lambda: s.app.state.shoal.engine.stats().num_waiting >= 8, timeout=30)
        client.completions.create(model="tiny-llama", prompt="now", max_tokens=4)
        assert client.batches.retrieve(batch.id).request_counts.completed <= 4
        client.batches.cancel(batch.id)


def test_multipart_upload_in_one_byte_chunks(tmp_path):
    content = b'{"custom_id": "a"}\r\n--not-the-boundary\r\n' * 3
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--XyZ--\r\n"
    )

    async def chunks():
        for i in range(len(body)):
            yield body[i : i + 1]

    dest = tmp_path / "upload.jsonl"
    upload = asyncio.run(save_upload(chunks(), "multipart/form-data; boundary=XyZ", "file", dest))
    assert upload.fields == {"purpose": "batch"} and upload.filename == "in.jsonl"
    assert dest.read_bytes() == content and upload.size == len(content)


def test_batch_survives_kill_9(model, tmp_path):
    data_dir = tmp_path / "data"
    lines = batch_lines(
        24, max_tokens=400
    )  # long enough to be mid-way when the progress (checkpointed each s) shows
    args = ("--batch-concurrency", "2", "--max-num-seqs", "2")
    first = ServerProcess(model, data_dir, *args).start()
    try:
        client = openai.OpenAI(base_url=first.url + "/v1", api_key="unused", max_retries=0)
        batch = client.batches.create(
            input_file_id=upload(client, lines), endpoint="/v1/completions", completion_window="24h"
        )
        wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3, timeout=60, interval=0.05
        )
        first.kill()
    finally:
        first.stop()
    # A new server on the same data dir picks the batch up where the files end.
    second = ServerProcess(model, data_dir, *args).start()
    try:
        client = openai.OpenAI(base_url=second.url + "/v1", api_key="unused", max_retries=0)
        done = client.batches.retrieve(batch.id)
        assert done.status == "in_progress" and done.request_counts.completed < len(lines), (
            "the batch finished before the kill"
        )
        done = wait_final(client, batch.id, timeout=120)
        assert (
            done.status == "completed"
            and done.request_counts.completed == len(lines)
            and done.request_counts.failed == 0
        )
        output = read_jsonl(client.files.content(done.output_file_id).text)
        assert Counter(r["custom_id"] for r in output) == Counter(line["custom_id"] for line in lines)
    finally:
        second.stop()


def _refused(url: str) -> bool:
    """No new request is served: the connection is refused, or (accepted by the closing socket's backlog)
    reset or closed without an answer."""
    try:
        httpx.get(url + "/health", timeout=1)
        return False
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True


def test_sigterm_drains_in_flight_requests(model, tmp_path):
    server = ServerProcess(model, tmp_path / "data", "--drain-timeout", "60").start()
    result: dict = {}
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once", "max_tokens": 800, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
            lines = []
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    started.set()
        result["lines"] = lines

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert started.wait(timeout=60)
        assert "lines" not in result, "the request finished before SIGTERM; make it longer"
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(server.url), timeout=10)  # the listening socket closes: no new requests
        thread.join(timeout=60)
        server.proc.wait(timeout=60)
    finally:
        server.stop()
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "length"
    assert len(lines) == 800 + 1
