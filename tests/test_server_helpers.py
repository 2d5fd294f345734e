"""Helpers for the server and batch tests (no tests here): a tiny model, servers in a thread or a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from tiny_models import make_tiny_hf_model

from shoal import AsyncLLM
from shoal.server.app import ServerConfig, build_app, make_server

REPO = Path(__file__).resolve().parent.parent
ENGINE_OPTIONS = {"kv_cache_memory": 32 << 20, "max_num_seqs": 16}


def make_model(root: Path, context: int | None = None) -> str:
    """A tiny random llama (gibberish, deterministic). A longer `context` allows requests that run for seconds."""
    path = make_tiny_hf_model("llama", root / "tiny-llama")
    if context is not None:
        config_path = Path(path) / "config.json"
        config = json.loads(config_path.read_text())
        config["max_position_embeddings"] = context
        config_path.write_text(json.dumps(config))
    return path


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text (the first sample whose name and labels start with `name`)."""
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a background thread, over a real AsyncLLM."""

    def __init__(self, model: str, config: ServerConfig | None = None, **engine_options: Any) -> None:
        self.model = model
        self.config = config or ServerConfig()
        self.engine_options = {**ENGINE_OPTIONS, **engine_options}
        self.server: uvicorn.Server | None = None
        self.app: Any = None
        self.port = free_port()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        engine = AsyncLLM(model=self.model, **self.engine_options)
        self.app = build_app(engine, self.config)
        self.server = make_server(self.app, "127.0.0.1", self.port, log_level="warning")
        await self.server.serve()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server is not None and self.server.started, timeout=60)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServerProcess:
    """`python -m shoal.server.cli serve ...` as a subprocess, for kill -9 and SIGTERM tests."""

    def __init__(self, model: str, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.args = [
            sys.executable, "-m", "shoal.server.cli", "serve", model, "--port", str(self.port),
            "--data-dir", str(data_dir), "--kv-cache-memory", "32MB", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, timeout=120, interval=0.2)
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def batch_lines(n: int, max_tokens: int = 8, url: str = "/v1/completions") -> list[dict[str, Any]]:
    lines = []
    for i in range(n):
        if url == "/v1/completions":
            body: dict[str, Any] = {"prompt": f"Line {i}: the quick brown fox", "max_tokens": max_tokens}
        else:
            body = {"messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": max_tokens}
        body.update(temperature=0, ignore_eos=True)
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    return lines


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    text = path.read_text() if isinstance(path, Path) else path
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_batch_with_client(client: Any, lines: list[dict], endpoint: str, timeout: float = 120) -> Any:
    """Upload `lines` and run them as a Batch API batch through the openai client; the completed batch."""
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")
    return wait_until(
        lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, timeout=timeout
    )
