"""shoal past one node, on Ray's own multi-node test cluster (ray.cluster_utils.Cluster: a head and a worker
node of one CPU each, on this machine): replicas go one per node and answer as one process does; a node
removed mid-job (its raylet gone, not just an actor) loses no line and writes none twice; `shoal serve --ray
ADDRESS` spreads its replicas over the nodes and keeps the Batch API's single writer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import httpx
import openai
import pytest
from test_ray import ENGINE, mixed_lines, ray_server, texts
from test_server_helpers import (
    ServerThread,
    make_model,
    read_jsonl,
    run_batch_with_client,
    write_jsonl,
)

import shoal
from shoal.server.app import ServerConfig

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), context=4096)


@pytest.fixture
def cluster():
    """A head and one worker node, one CPU each; the test process is a driver connected to it."""
    from shoal.ray import connect

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    connect(nodes.address)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def reference(model: str, source, output) -> None:
    from shoal.server.batch_jobs import local_answerer, run_file
    from shoal.server.serving import OpenAIServing

    async def run() -> None:
        engine = shoal.AsyncLLM(model, **ENGINE)
        try:
            await run_file(local_answerer(OpenAIServing(engine)), source, output, show_progress=False)
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_replicas_go_one_per_node_and_a_removed_node_loses_no_line(model, tmp_path, cluster):
    from shoal.ray import ReplicaPool
    from shoal.server.batch_jobs import run_file

    lines = mixed_lines(40, max_tokens=200)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    reference(model, source, tmp_path / "single.jsonl")
    pool = ReplicaPool(model, ENGINE, replicas=2, num_threads=1).start()
    before = pool.stats()
    assert len({s["node"] for s in before}) == 2  # one replica on each node
    head = ray.get_runtime_context().get_node_id()
    victim = next(i for i, s in enumerate(before) if s["node"] != head)  # the replica on the worker node
    worker = next(n for n in cluster.worker_nodes)

    output = tmp_path / "ray.jsonl"
    done: dict = {}

    def job() -> None:
        done["progress"] = asyncio.run(
            run_file(pool.answer, source, output, concurrency=16, show_progress=False)
        )

    runner = threading.Thread(target=job)
    runner.start()
    held = 0
    try:  # Ray starts and stops nodes from the main thread only
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and runner.is_alive():
            written = len(read_jsonl(output)) if output.exists() else 0
            if (
                written >= 3 and pool.in_flight[victim] > 0
            ):  # lines written, and the worker's replica holds others
                held = pool.in_flight[victim]
                cluster.remove_node(worker)  # the whole node: its raylet and every process on it
                cluster.add_node(num_cpus=1)  # a new machine joins; Ray restarts the replica there
                break
            time.sleep(0.005)
    finally:
        runner.join(timeout=600)
        after = pool.stats()
        pool.stop()
    progress = done["progress"]
    assert held > 0  # the node went away while its replica held lines
    assert after[victim]["node"] not in (before[victim]["node"], head)  # restarted on the new node
    assert progress.completed == 40
    assert texts(output) == texts(tmp_path / "single.jsonl")  # every line once, the same answers


def test_shoal_serve_on_a_cluster_spreads_replicas_and_answers_like_one_process(model, tmp_path, cluster):
    with ray_server(model, cluster.address, tmp_path, timeout=300) as url:
        # Serve's proxy prefers the replica on its own node while it has room: enough requests at once fill it
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = pool.map(
                lambda i: httpx.post(
                    url + "/v1/completions",
                    json={"prompt": f"hi {i}", "max_tokens": 24, "ignore_eos": True},
                    timeout=120,
                ),
                range(64),
            )
            nodes = {answer.headers["x-shoal-replica"].rsplit("@", 1)[1] for answer in answers}
        assert len(nodes) == 2, nodes  # a replica on each node
        body = {"model": "tiny-llama", "prompt": "Once", "max_tokens": 8, "temperature": 0.9, "seed": 5}
        with ServerThread(model, ServerConfig(), **ENGINE) as single:
            expected = httpx.post(single.url + "/v1/completions", json=body).json()["choices"][0]["text"]
        assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] == expected
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)  # the driver's Batch API
        lines = [line for line in mixed_lines(8) if line["url"] == "/v1/completions"]
        done = run_batch_with_client(client, lines, "/v1/completions", timeout=180)
        assert done.request_counts.completed == len(lines)
