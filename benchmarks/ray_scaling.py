"""The same batch job (OpenAI batch lines, the default model) on one process with 2 threads, and on a local
Ray instance with 1 and 2 replicas of 1 thread each, in one run. Prints tokens/s of each, Ray's start-up time
(instance and replicas with their models) and its cost per row (lines of one token sent one at a time, through the
pool against locally); writes JSON.

On a machine with few cores no speed-up is expected from more replicas: they share the same cores. Replicas
pay off across machines, each added machine adding about one machine's single-process throughput, less the
per-row cost measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_isa, cpu_name, write_json

from shoal.server.batch_jobs import local_answerer, run_file


def write_lines(path: Path, count: int, max_tokens: int) -> Path:
    with open(path, "w") as f:
        for i in range(count):
            body = {
                "messages": [{"role": "user", "content": f"Write a short note about the number {i}."}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0.7,
                "seed": i,
            }
            f.write(
                json.dumps(
                    {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
                + "\n"
            )
    return path


def timed_job(answer, source: Path, folder: Path, name: str, concurrency: int) -> dict:
    output = folder / f"{name}.jsonl"
    start = time.perf_counter()
    progress = asyncio.run(run_file(answer, source, output, concurrency=concurrency, show_progress=False))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "lines": progress.completed,
        "generated_tokens": progress.completion_tokens,
        "tokens_per_s": progress.completion_tokens / seconds,
    }


def local_job(model, source, folder, name, threads, concurrency) -> dict:
    from shoal import AsyncLLM
    from shoal.server.serving import OpenAIServing

    async def make():
        return AsyncLLM(model, num_threads=threads, kv_cache_memory=512 << 20)

    engine = asyncio.run(make())
    try:
        return timed_job(local_answerer(OpenAIServing(engine)), source, folder, name, concurrency)
    finally:
        asyncio.run(engine.shutdown())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--lines", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--overhead-lines", type=int, default=200)
    parser.add_argument("--output", default="benchmarks/results/ray_scaling.json")
    args = parser.parse_args()

    import ray

    from shoal.models.loader import default_model_path
    from shoal.ray import ReplicaPool, connect

    model = args.model or str(default_model_path())
    folder = Path(tempfile.mkdtemp(prefix="shoal-ray-bench-"))
    job = write_lines(folder / "job.jsonl", args.lines, args.max_tokens)
    tiny = write_lines(folder / "tiny.jsonl", args.overhead_lines, 1)
    result: dict = {
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "cores": os.cpu_count(),
        "model": model,
        "lines": args.lines,
    }
    result["single_process_2_threads"] = local_job(model, job, folder, "local2", 2, 64)
    local_tiny = local_job(model, tiny, folder, "local-tiny", 1, 1)  # one line at a time: the per-row cost

    start = time.perf_counter()
    connect("local", num_cpus=os.cpu_count())
    result["ray_instance_start_s"] = time.perf_counter() - start
    options = {"kv_cache_memory": 512 << 20}
    for replicas in (1, 2):
        start = time.perf_counter()
        pool = ReplicaPool(model, options, replicas=replicas, num_threads=1).start()
        started = time.perf_counter() - start
        run = timed_job(pool.answer, job, folder, f"ray{replicas}", 64)
        run["replicas_start_s"] = started
        if replicas == 1:
            ray_tiny = timed_job(pool.answer, tiny, folder, "ray-tiny", 1)
            result["per_row_overhead_ms"] = (
                1e3 * (ray_tiny["seconds"] - local_tiny["seconds"]) / args.overhead_lines
            )
        result[f"ray_{replicas}_replicas_1_thread"] = run
        pool.stop()
    ray.shutdown()

    base = result["single_process_2_threads"]["tokens_per_s"]
    print(
        f"CPU: {result['cpu']} ({result['isa']}, {result['cores']} cores); {args.lines} lines of {args.max_tokens} tokens"
    )
    print(f"single process, 2 threads: {base:7.1f} tokens/s")
    for replicas in (1, 2):
        run = result[f"ray_{replicas}_replicas_1_thread"]
        run["ratio_to_single_process"] = run["tokens_per_s"] / base
        print(
            f"Ray, {replicas} replica(s) x 1 thread: {run['tokens_per_s']:7.1f} tokens/s "
            f"({run['ratio_to_single_process']:.2f}x), replicas up in {run['replicas_start_s']:.1f} s"
        )
    print(
        f"Ray instance start {result['ray_instance_start_s']:.1f} s; per-row cost {result['per_row_overhead_ms']:.2f} ms"
    )
    write_json(args.output, result)


if __name__ == "__main__":
    main()
