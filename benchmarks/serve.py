"""Load test of OpenAI-compatible servers: throughput and latency at rising concurrency.

    shoal serve &                      # or any OpenAI-compatible server
    python benchmarks/serve.py --url http://127.0.0.1:8000 --max-tokens 32

    python benchmarks/serve.py --against-llama-server [--gguf FILE] [--precision int8] [--isa avx2]

Per concurrency level it sends a fixed set of streaming chat requests (ignore_eos, so every answer has exactly
--max-tokens tokens) with that many in flight, and reports requests/s, output tokens/s, time to first token
(TTFT) and inter-token latency (ITL, the gaps between streamed chunks) at p50/p99. Writes JSON and a PNG plot.

--against-llama-server starts `shoal serve` and then llama.cpp's `llama-server` (64 slots, continuous
batching, its default KV layout; built from the llama-cpp-python sdist as vs_llamacpp.py builds llama.cpp) on
the same GGUF file (default: the default model), one after the other on an idle machine, runs the same levels
against each with the same threads, and prints them side by side with the ratio shoal / llama-server.
--isa avx2 limits both to AVX2, FMA and F16C, as vs_llamacpp.py's --isa does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

TOPICS = [
    "the ocean", "volcanoes", "honeybees", "the moon", "trains", "chess", "bread", "rainforests", "glaciers",
    "owls", "bicycles", "lighthouses", "coffee", "deserts", "comets", "libraries",
]  # fmt: skip
TASKS = [
    "Write two sentences about {}.",
    "Give three facts about {}.",
    "Describe {} to a child.",
    "Write a haiku about {}.",
]
PROMPTS = [task.format(topic) for topic in TOPICS for task in TASKS]  # 64 fixed prompts


@dataclass
class RequestResult:
    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestResult:
    """One streamed chat; sent again once if the server closed its kept-alive connection before answering
    (llama-server does now and then: a race of the connection pool, not a failed request)."""
    for _ in range(2):
        try:
            return await stream_one(http, model, prompt, max_tokens)
        except httpx.RemoteProtocolError:
            continue
    return RequestResult(ok=False)


async def stream_one(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
    except httpx.RemoteProtocolError:
        if last is None:
            raise
        return result
    except httpx.HTTPError:
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or len(result.gaps) + (last is not None)  # no usage: chunks
    result.ok = True
    return result


async def run_level(
    http: httpx.AsyncClient, model: str, concurrency: int, num_requests: int, max_tokens: int
) -> LevelResult:
    gate = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> RequestResult:
        async with gate:
            return await one_request(http, model, PROMPTS[i % len(PROMPTS)], max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(i) for i in range(num_requests)))
    duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    gaps = [g for r in ok for g in r.gaps]
    ttfts = [r.ttft for r in ok]
    return LevelResult(
        concurrency=concurrency,
        requests=len(ok),
        errors=len(results) - len(ok),
        duration_s=round(duration, 2),
        requests_per_s=round(len(ok) / duration, 3),
        output_tokens_per_s=round(sum(r.output_tokens for r in ok) / duration, 1),
        ttft_p50_ms=round(percentile(ttfts, 50) * 1000, 1),
        ttft_p99_ms=round(percentile(ttfts, 99) * 1000, 1),
        itl_p50_ms=round(percentile(gaps, 50) * 1000, 1),
        itl_p99_ms=round(percentile(gaps, 99) * 1000, 1),
    )


def markdown_table(levels: list[LevelResult]) -> str:
    rows = [
        "| concurrency | requests/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in levels:
        rows.append(
            f"| {r.concurrency} | {r.requests_per_s:.2f} | {r.output_tokens_per_s:.1f} | {r.ttft_p50_ms:.0f} | "
            f"{r.ttft_p99_ms:.0f} | {r.itl_p50_ms:.0f} | {r.itl_p99_ms:.0f} |"
        )
    return "\n".join(rows)


def plot(levels: list[LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.concurrency for r in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(xs, [r.output_tokens_per_s for r in levels], "o-")
    axes[0].set(title="output tokens/s", xlabel="concurrency")
    for ax, name in ((axes[1], "ttft"), (axes[2], "itl")):
        ax.plot(xs, [getattr(r, f"{name}_p50_ms") for r in levels], "o-", label="p50")
        ax.plot(xs, [getattr(r, f"{name}_p99_ms") for r in levels], "s--", label="p99")
        ax.set(title=f"{name.upper()} (ms)", xlabel="concurrency", ylim=(0, None))
        ax.legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args: argparse.Namespace, url: str) -> list[LevelResult]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.levels) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        await one_request(http, model, "Hello", 4)  # warm-up
        levels = []
        for concurrency in args.levels:
            num = min(max(args.requests_per_level, 2 * concurrency), args.max_requests)
            level = await run_level(http, model, concurrency, num, args.max_tokens)
            print(
                f"c={concurrency:>3}: {level.requests} ok, {level.errors} errors in {level.duration_s}s, "
                f"{level.output_tokens_per_s} tok/s, TTFT p50 {level.ttft_p50_ms} ms, ITL p50 {level.itl_p50_ms} ms",
                flush=True,
            )
            levels.append(level)
        return levels


# ---- both servers, started here on the same file ----

SLOTS, CONTEXT_PER_SLOT = 64, 256


def llama_server_binary(isa: str | None) -> str | None:
    """llama-server in vs_llamacpp.py's build for `isa` (None: this CPU's), its target built there when missing."""
    from vs_llamacpp import build_folder, build_llama_cpp

    build = build_folder(isa)
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return str(binary)
    if build_llama_cpp(isa) is None:  # the source, configured, and its other tools
        return None
    print("building llama-server ...", flush=True)
    built = subprocess.run(
        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-server"],
        capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        print(f"building llama-server failed:\n{built.stderr[-3000:]}")
        return None
    return str(binary)


def wait_ready(process: subprocess.Popen, url: str, path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering {url}{path}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}{path} did not answer within {timeout:.0f} s")


def serve_and_measure(command: list[str], ready_path: str, port: int, args, log: Path) -> list[LevelResult]:
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(process, url, ready_path)
            return asyncio.run(main_async(args, url))
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def compare_with_llama_server(args: argparse.Namespace) -> dict:
    from machine import cpu_name

    from shoal.models.loader import default_model_path

    gguf = args.gguf or default_model_path()
    binary = llama_server_binary(args.isa)
    if binary is None:
        raise SystemExit("llama-server could not be found or built (needs cmake and a C/C++ compiler)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shoal_command = [sys.executable, "-m", "shoal.cli", "serve", "--model", gguf, "--port", "8123",
                     "--num-threads", str(args.threads), "--max-num-seqs", str(SLOTS),
                     "--precision", args.precision, "--kernels", args.isa or "auto"]  # fmt: skip
    llama_command = [binary, "-m", gguf, "--port", "8124", "-t", str(args.threads), "-np", str(SLOTS), "-cb",
                     "-c", str(SLOTS * CONTEXT_PER_SLOT), "-b", "2048", "-ub", "512"]  # fmt: skip
    limited = f"; both servers limited to {args.isa}" if args.isa else ""
    print(f"CPU: {cpu_name()}; {args.threads} threads; {gguf}{limited}", flush=True)
    print("shoal serve:", flush=True)
    ours = serve_and_measure(shoal_command, "/v1/models", 8123, args, Path(f"{args.out}.shoal.log"))
    print("llama-server:", flush=True)
    theirs = serve_and_measure(llama_command, "/health", 8124, args, Path(f"{args.out}.llama-server.log"))
    print("\n| concurrency | shoal tok/s | llama-server tok/s | ratio | ITL p50 shoal / llama-server (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for a, b in zip(ours, theirs, strict=True):
        ratio = a.output_tokens_per_s / b.output_tokens_per_s if b.output_tokens_per_s else float("nan")
        print(f"| {a.concurrency} | {a.output_tokens_per_s:.1f} | {b.output_tokens_per_s:.1f} | {ratio:.2f}x | "
              f"{a.itl_p50_ms:.1f} / {b.itl_p50_ms:.1f} |")  # fmt: skip
    return {
        "cpu": cpu_name(),
        "gguf": str(gguf),
        "precision": args.precision,
        "isa": args.isa,
        "shoal": [asdict(r) for r in ours],
        "llama_server": [asdict(r) for r in theirs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64]
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--requests-per-level", type=int, default=8, help="at least 2x the concurrency is sent"
    )
    parser.add_argument("--max-requests", type=int, default=256, help="cap per level")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    parser.add_argument(
        "--against-llama-server", action="store_true", help="start shoal serve and llama-server, compare them"
    )
    parser.add_argument("--gguf", help="the file both servers load (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="float32", help="shoal's precision option")
    parser.add_argument(
        "--isa",
        choices=["avx2"],
        help="both servers limited to this instruction set (shoal's build of it, llama-server built for it)",
    )
    args = parser.parse_args()

    if args.against_llama_server:
        result = compare_with_llama_server(args)
        Path(f"{args.out}-vs-llama-server.json").write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}-vs-llama-server.json")
        return
    levels = asyncio.run(main_async(args, args.url))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
    Path(f"{args.out}.json").write_text(
        json.dumps({"config": config, "levels": [asdict(r) for r in levels]}, indent=2)
    )
    plot(levels, Path(f"{args.out}.png"), f"shoal serve, {args.max_tokens} output tokens per request")
    print()
    print(markdown_table(levels))
    print(f"\nwrote {args.out}.json and {args.out}.png")
    if any(r.errors for r in levels):
        print("some requests failed: see the errors column in the JSON")


if __name__ == "__main__":
    main()
