"""shoal on a local Ray instance (2 CPUs): `shoal batch --ray` answers every line exactly once with the same
text as one process, even when a replica dies mid-job; the Ray Data processor gives LLM.generate's rows."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from test_server_helpers import (
    REPO,
    ServerThread,
    batch_lines,
    free_port,
    make_model,
    metric,
    read_jsonl,
    run_batch_with_client,
    wait_until,
    write_jsonl,
)

import shoal
from shoal.server.app import ServerConfig

ray = pytest.importorskip("ray")

ENGINE = {"kv_cache_memory": 32 << 20}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), context=4096)


def mixed_lines(count: int, max_tokens: int = 8) -> list[dict]:
    """Greedy and seeded lines, chat and completions."""
    lines = batch_lines(count // 2, max_tokens) + batch_lines(
        count - count // 2, max_tokens, "/v1/chat/completions"
    )
    for i, line in enumerate(lines):
        line["custom_id"] = f"line-{i}"
        if i % 3 == 1:
            line["body"].update(temperature=0.9, seed=100 + i)
    return lines


def run_batch(model: str, source, output, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "shoal.server.cli", "batch", str(source), "-o", str(output), "--model", model,
        "--kv-cache-memory", "32MB", "--no-progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def texts(path) -> dict[str, str]:
    records = read_jsonl(path)
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)), "a line was written twice"
    return {r["custom_id"]: _text(r) for r in records}


def _text(record: dict) -> str:
    choice = record["response"]["body"]["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_shoal_batch_on_ray_matches_one_process(model, tmp_path):
    lines = mixed_lines(24)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    single = run_batch(model, source, tmp_path / "single.jsonl")
    assert single.returncode == 0, single.stderr[-2000:]
    spread = run_batch(
        model, source, tmp_path / "ray.jsonl", "--ray", "local", "--replicas", "2", "--num-threads", "1"
    )
    assert spread.returncode == 0, spread.stderr[-3000:]
    assert "24/24 lines answered: 24 ok" in spread.stderr
    reference = texts(tmp_path / "single.jsonl")
    assert sorted(reference) == sorted(line["custom_id"] for line in lines)
    assert texts(tmp_path / "ray.jsonl") == reference
    again = run_batch(model, source, tmp_path / "ray.jsonl", "--ray", "local", "--replicas", "1")
    assert again.returncode == 0 and "(24 by an earlier run)" in again.stderr  # resumable: nothing redone
    assert len(read_jsonl(tmp_path / "ray.jsonl")) == 24


@contextmanager
def ray_server(model: str, address: str, folder: Path, timeout: float) -> Iterator[str]:
    """`shoal serve --ray ADDRESS` with two replicas, in a process of its own, once healthy: its URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "shoal.server.cli", "serve", "--model", model, "--ray", address, "--replicas", "2",
        "--num-threads", "1", "--port", str(port), "--kv-cache-memory", "32MB", "--data-dir", str(folder / "data"),
    ]  # fmt: skip
    with open(folder / "serve.log", "wb") as log:
        server = subprocess.Popen(
            command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _healthy(url, server), timeout=timeout, interval=1)
            # the driver's Batch API starts once the replicas answer: wait for it too
            wait_until(lambda: httpx.get(url + "/v1/batches").status_code == 200, timeout=60)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=120)


def test_shoal_serve_on_ray_answers_like_one_process_and_spreads_requests(model, tmp_path):
    with ray_server(model, "local", tmp_path, timeout=240) as url:
        with ServerThread(model, ServerConfig(), **ENGINE) as single:
            for base in (url, single.url):
                client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
                chat = client.chat.completions.create(
                    model="tiny-llama",
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=8,
                    temperature=0.9,
                    seed=3,
                )
                streamed = "".join(
                    c.choices[0].delta.content or ""
                    for c in client.chat.completions.create(
                        model="tiny-llama", messages=[{"role": "user", "content": "Hey"}], max_tokens=8, seed=4,
                        temperature=0.9, stream=True,
                    )
                    if c.choices
                )  # fmt: skip
                answers = (chat.choices[0].message.content, streamed)
                if base == url:
                    spread = answers
            assert spread == answers  # the same seeded answers as a single-process server
            # The Batch API: one writer (the driver), its lines answered by the replicas.
            lines = [line for line in mixed_lines(12) if line["url"] == "/v1/completions"]
            ray_client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            done = run_batch_with_client(ray_client, lines, "/v1/completions")
            output = tmp_path / "batch.jsonl"
            output.write_text(ray_client.files.content(done.output_file_id).text)
            expected = {
                line["custom_id"]: httpx.post(single.url + line["url"], json=line["body"]).json()["choices"][
                    0
                ]["text"]
                for line in lines
            }
            assert texts(output) == expected and done.request_counts.completed == len(lines)
        replicas = {
            httpx.post(url + "/v1/completions", json={"prompt": f"hi {i}", "max_tokens": 2}).headers[
                "x-shoal-replica"
            ]
            for i in range(16)
        }
        assert len(replicas) == 2, replicas
        served: dict[str, float] = {}  # each replica's own count, from its /metrics
        for _ in range(40):
            scrape = httpx.get(url + "/metrics")
            served[scrape.headers["x-shoal-replica"]] = metric(
                scrape.text, 'shoal_requests_total{route="/v1/completions",status="200"}'
            )
            if len(served) == 2:
                break
        assert len(served) == 2 and all(count > 0 for count in served.values()), served


def _healthy(url: str, server: subprocess.Popen) -> bool:
    if server.poll() is not None:
        raise RuntimeError(f"shoal serve --ray exited with {server.returncode}")
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def local_ray():
    from shoal.ray import connect

    connect("local", num_cpus=2)
    yield ray
    ray.shutdown()


def test_a_killed_replica_loses_no_line_and_writes_none_twice(model, tmp_path, local_ray):
    from shoal.ray import ReplicaPool
    from shoal.server.batch_jobs import local_answerer, run_file
    from shoal.server.serving import OpenAIServing

    lines = mixed_lines(48, max_tokens=300)
    source = write_jsonl(tmp_path / "in.jsonl", lines)

    async def reference() -> None:
        engine = shoal.AsyncLLM(model, **ENGINE)
        try:
            await run_file(
                local_answerer(OpenAIServing(engine)), source, tmp_path / "single.jsonl", show_progress=False
            )
        finally:
            await engine.shutdown()

    asyncio.run(reference())
    pool = ReplicaPool(model, ENGINE, replicas=2, num_threads=1).start()
    victim = pool.actors[0]
    first_pid = ray.get(victim.ready.remote())

    output = tmp_path / "ray.jsonl"
    held_at_kill: list[int] = []

    def kill_when_busy() -> None:  # once some lines are written and the victim holds others
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            written = len(read_jsonl(output)) if output.exists() else 0
            if written >= 3 and pool.in_flight[0] > 0:
                held_at_kill.append(pool.in_flight[0])
                ray.kill(victim, no_restart=False)  # Ray restarts it; the lines it held run again
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        progress = asyncio.run(run_file(pool.answer, source, output, concurrency=16, show_progress=False))
    finally:
        killer.join()
        stats = pool.stats()
        pool.stop()
    assert held_at_kill and held_at_kill[0] > 0  # it died holding lines...
    assert stats[0]["pid"] != first_pid  # ...and Ray restarted it
    assert progress.completed == 48
    assert texts(output) == texts(tmp_path / "single.jsonl")


def test_the_ray_data_processor_gives_llm_generate_rows(model, local_ray):
    from shoal.ray import build_processor

    prompts = [f"Row {i}: the quick brown fox" for i in range(64)]
    rows = [
        {"custom_id": f"r{i}", "prompt": p, "seed": i, "temperature": 0.8 if i % 2 else 0.0}
        for i, p in enumerate(prompts)
    ]
    rows[5] = {"custom_id": "r5", "prompt": "x", "temperature": -1.0, "seed": 5}  # a bad row
    processor = build_processor(model, ENGINE, {"max_tokens": 6}, replicas=2, num_threads=1, batch_size=16)
    got = {r["custom_id"]: r for r in processor(ray.data.from_items(rows)).take_all()}
    assert (
        len(got) == 64 and "temperature must be" in got["r5"]["error"] and got["r5"]["generated_text"] is None
    )
    llm = shoal.LLM(model, **ENGINE)
    for i, row in enumerate(rows):
        if i == 5:
            continue
        params = shoal.SamplingParams(max_tokens=6, seed=row["seed"], temperature=row["temperature"])
        (out,) = llm.generate(row["prompt"], params, use_tqdm=False)
        result = got[row["custom_id"]]
        assert result["generated_text"] == out.outputs[0].text and result["error"] is None
        assert result["num_generated_tokens"] == len(out.outputs[0].token_ids)
        assert result["num_input_tokens"] == len(out.prompt_token_ids)
        assert result["finish_reason"] == out.outputs[0].finish_reason
