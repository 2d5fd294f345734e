"""What a hostile client, a huge input or a second server must not break (issue 10), each against a real
server: a second server on one data dir, huge bodies and headers, inputs that used to answer 500, one request
with more sequences than --max-waiting, and the counting of refused requests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_server_helpers import (
    REPO,
    ServerProcess,
    ServerThread,
    batch_lines,
    make_model,
    metric,
    read_jsonl,
    wait_until,
    write_jsonl,
)

from shoal import AsyncLLM
from shoal.server.app import ServerConfig, build_app
from shoal.server.batch_store import BatchStore
from shoal.server.batch_worker import BatchWorker
from shoal.server.protocol import Batch, FileObject


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(model, ServerConfig(max_waiting=256, max_n=16)) as s:
        yield s


class RawConnection:
    """One keep-alive HTTP/1.1 connection, to see whether the server keeps it after an answer."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buffer = b""

    def post(self, path: str, body: bytes, extra_headers: str = "") -> tuple[int, dict[str, str], bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}\r\n"
        )
        self.sock.sendall(head.encode() + body)
        return self.read_response()

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def error_message(body: bytes) -> str:
    return json.loads(body)["error"]["message"]


GOOD = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()

# Bodies that answered 500 before (and dropped the connection); each must be a 400 that says what to change.
FORMER_500S = [
    (
        '{"prompt": "hi", "temperature": 1e-300}',
        "/v1/completions",
        "temperature must be 0 (greedy) or between",
    ),
    (
        '{"prompt": "hi", "repetition_penalty": 1e-300}',
        "/v1/completions",
        "repetition_penalty must be between",
    ),
    ('{"prompt": "a\\ud800b"}', "/v1/completions", "lone surrogate"),
    ('{"prompt": ["ok", "\\ud800"]}', "/v1/completions", "lone surrogate"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "/v1/chat/completions", "lone surrogate"),
    (
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]}',
        "/v1/chat/completions",
        "messages.0.content.0.text",
    ),
    ('{"prompt": "hi", "stop": ["\\ud800"]}', "/v1/completions", "lone surrogate"),
    ('{"prompt": "hi", "seed": 1180591620717411303424}', "/v1/completions", "seed must be an integer in"),
]


@pytest.mark.parametrize(("body", "url", "words"), FORMER_500S)
def test_former_500s_are_400s_on_a_connection_that_keeps_working(server, body, url, words):
    conn = RawConnection(server.url)
    try:
        status, headers, answer = conn.post(url, body.encode())
        assert status == 400, answer
        assert words in error_message(answer)
        assert headers.get("connection") != "close"
        status, _, answer = conn.post("/v1/completions", GOOD)  # the same connection
        assert status == 200, answer
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("body", "url", "words"),
    [
        ('{"prompt": "hi", "temperature": Infinity}', "/v1/completions", "Infinity is not valid JSON"),
        ('{"prompt": "hi", "top_p": NaN}', "/v1/completions", "NaN is not valid JSON"),
        (
            '{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}',
            "/v1/chat/completions",
            "max_tokens must be at least 1",
        ),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', "/v1/chat/completions", "messages.0.role"),
        ("[" * 100_000 + "]" * 100_000, "/v1/completions", "the request body"),
    ],
)
def test_smaller_findings_are_400s(server, body, url, words):
    resp = httpx.post(server.url + url, content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert words in resp.json()["error"]["message"]


def test_one_request_cannot_bypass_max_waiting(server):
    body = {"prompt": ["hi"] * 1000, "n": 16, "max_tokens": 1}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "too_many_sequences"
    assert "16000 sequences (1000 prompts x n=16)" in error["message"] and "--max-waiting" in error["message"]
    chat = {"messages": [[{"role": "user", "content": "hi"}]] * 20, "n": 13, "max_tokens": 1}
    resp = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60)
    assert resp.status_code == 400 and "260 sequences (20 prompts x n=13)" in resp.text
    assert server.app.state.shoal.admission.waiting == 0  # nothing was admitted
    fits = {"prompt": ["hi"] * 16, "n": 16, "max_tokens": 1}  # exactly 256
    assert httpx.post(server.url + "/v1/completions", json=fits, timeout=120).status_code == 200


def test_refusals_before_admission_are_counted(server):
    def count() -> float:
        text = httpx.get(server.url + "/metrics").text
        try:
            return metric(text, 'shoal_requests_total{route="/v1/completions",status="400"}')
        except KeyError:
            return 0.0

    before = count()
    bad = [b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": "hi", "n": 99}', b'{"prompt": ""}']
    for body in bad:
        resp = httpx.post(server.url + "/v1/completions", content=body)
        assert resp.status_code == 400
    assert count() - before == len(bad)


def test_oversized_headers_get_431(model):
    with ServerThread(model, ServerConfig(max_header_bytes=8192)) as s:
        conn = RawConnection(s.url)
        try:
            status, _, answer = conn.post("/v1/completions", GOOD, f"X-Big: {'a' * (1 << 20)}\r\n")
        finally:
            conn.close()
        assert status == 431
        assert "8192 bytes (--max-header-bytes)" in error_message(answer)
        ok = httpx.post(s.url + "/v1/completions", content=GOOD, headers={"X-Fine": "a" * 4000})
        assert ok.status_code == 200


def _max_health_latency(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            assert client.get(url + "/health").status_code == 200
            out.append(time.perf_counter() - start)
            time.sleep(0.02)


def test_a_50mb_body_is_refused_with_413_while_health_stays_fast(model, tmp_path):
    server = ServerProcess(model, tmp_path / "data").start()
    try:
        latencies: list[float] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_max_health_latency, args=(server.url, stop, latencies))
        watcher.start()
        try:
            time.sleep(0.2)
            with httpx.Client(timeout=120) as client:
                huge = json.dumps({"prompt": "lorem ipsum " * 4_200_000}).encode()  # 50 MB
                resp = client.post(server.url + "/v1/completions", content=huge)
                assert resp.status_code == 413, resp.text[:300]
                message = resp.json()["error"]["message"]
                assert str(8 << 20) in message and "--max-request-bytes" in message

                def chunks():
                    for _ in range(20):
                        yield b" " * (1 << 20)

                chunked = client.post(server.url + "/v1/completions", content=chunks())
                assert chunked.status_code == 413
                # Under the limit but far too long for the context: refused before it is tokenized.
                long = json.dumps({"prompt": "lorem ipsum " * 600_000}).encode()  # 7 MB
                resp = client.post(server.url + "/v1/completions", content=long)
                assert resp.status_code == 400 and "shorten the prompt" in resp.text
                assert client.post(server.url + "/v1/completions", content=GOOD).status_code == 200
            time.sleep(0.2)
        finally:
            stop.set()
            watcher.join()
        print(
            f"/health during the huge bodies: {len(latencies)} checks, slowest {max(latencies) * 1e3:.0f} ms"
        )
        assert len(latencies) > 5 and max(latencies) < 1.0, max(latencies)
    finally:
        server.stop()


def test_a_second_server_on_one_data_dir_refuses_and_each_batch_line_is_answered_once(model, tmp_path):
    data = tmp_path / "data"
    first = ServerProcess(model, data, "--max-num-seqs", "8").start()
    try:
        second = ServerProcess(model, data)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        result = subprocess.run(second.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert f"PID {first.proc.pid}" in result.stderr and "--data-dir" in result.stderr, result.stderr
        assert time.monotonic() - started < 60
        with pytest.raises(httpx.ConnectError):
            httpx.get(second.url + "/health")

        client = openai.OpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
        lines = batch_lines(60, max_tokens=2)
        data_bytes = "".join(json.dumps(line) + "\n" for line in lines).encode()
        upload = client.files.create(file=("in.jsonl", data_bytes), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
        done = wait_until(
            lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, timeout=120
        )
        records = read_jsonl(client.files.content(done.output_file_id).text)
        ids = [r["custom_id"] for r in records]
        assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
        assert done.request_counts.completed == done.request_counts.total == 60
    finally:
        first.stop()


def test_in_one_process_the_data_dir_is_locked_too(tmp_path):
    from shoal.server.batch_store import DataDirInUseError

    store = BatchStore(tmp_path)
    with pytest.raises(DataDirInUseError, match=f"PID {os.getpid()}"):
        BatchStore(tmp_path)
    store.close()
    BatchStore(tmp_path).close()  # released


def test_a_server_that_cannot_bind_starts_no_batch_work(model, tmp_path, monkeypatch):
    from shoal.server.app import make_server

    store = BatchStore(tmp_path / "data")
    path = write_jsonl(tmp_path / "in.jsonl", batch_lines(3))
    file = store.put_file(FileObject(bytes=path.stat().st_size, filename="in.jsonl", purpose="batch"), path)
    store.put_batch(Batch(endpoint="/v1/completions", input_file_id=file.id))
    started: list[bool] = []
    monkeypatch.setattr(BatchWorker, "start", lambda self: started.append(True))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        app = build_app(AsyncLLM(model=model, kv_cache_memory=16 << 20), ServerConfig(), store)
        server = make_server(app, "127.0.0.1", busy.getsockname()[1], log_level="critical")
        with pytest.raises(SystemExit):
            asyncio.run(server.serve())
    assert started == []


def test_shoal_batch_with_a_100mb_line_stays_small(model, tmp_path):
    lines = [json.dumps(line) for line in batch_lines(4, max_tokens=2)]
    big = json.dumps(
        {
            "custom_id": "big",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "lorem ipsum " * 8_750_000},
        }
    )
    assert len(big) > 100_000_000
    source = write_jsonl(tmp_path / "in.jsonl", [lines[0], lines[1], big, lines[2], lines[3]])
    output, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    command = [
        sys.executable, "-m", "shoal.server.cli", "batch", str(source), "-o", str(output),
        "--error-file", str(errors), "--model", model, "--kv-cache-memory", "16MB", "--no-progress",
    ]  # fmt: skip
    # A parent that reports its child's peak RSS (kB): the measurement is of that process alone.
    measure = (
        "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", measure, *command], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mib = int(result.stdout.split()[-1]) / 1024
    print(f"shoal batch with a 100 MB line: peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 2048, f"peak RSS {peak_mib:.0f} MiB"
    assert sorted(r["custom_id"] for r in read_jsonl(output)) == [f"req-{i}" for i in range(4)]
    (failed,) = read_jsonl(errors)
    assert failed["error"]["code"] == "line_too_long" and failed["error"]["line"] == 3
    assert "--max-line-bytes" in failed["error"]["message"]
    assert Path(errors).stat().st_size < 10_000
