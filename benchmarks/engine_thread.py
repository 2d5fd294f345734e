"""Batch-1 decode on the engine's own thread (AsyncLLM: what the server, sessions and Ray replicas run) against
the same on the calling thread (LLM), in one run, as a ratio: the engine thread must not be slower.

It was 0.3x before AsyncLLM let the loading thread's OpenMP team go (libgomp stops letting idle workers spin
when a process has more of its threads than cores). Prints tokens/s of both and the ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
from machine import cpu_isa, cpu_name, write_json

import shoal


def on_calling_thread(llm: shoal.LLM, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    llm.generate(
        [prompt], shoal.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0), use_tqdm=False
    )
    return tokens / (time.perf_counter() - start)


async def on_engine_thread(engine: shoal.AsyncLLM, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    params = shoal.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    async for _ in engine.generate(prompt, params):  # streamed, as the server does
        pass
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/engine_thread.json")
    args = parser.parse_args()
    model = shoal.load_model(args.model)
    prompt = model.render_chat([{"role": "user", "content": "Tell me a long story."}])
    llm = shoal.LLM(model, kv_cache_memory=128 << 20, enable_prefix_caching=False)
    calling = [on_calling_thread(llm, prompt, args.tokens) for _ in range(args.rounds)]

    async def engine_rounds() -> list[float]:
        engine = shoal.AsyncLLM(model, kv_cache_memory=128 << 20, enable_prefix_caching=False)
        try:
            return [await on_engine_thread(engine, prompt, args.tokens) for _ in range(args.rounds)]
        finally:
            await engine.shutdown()

    engine = asyncio.run(engine_rounds())
    result = {
        "cpu": cpu_name(), "isa": cpu_isa(), "threads": torch.get_num_threads(), "weights": model.describe_weights(),
        "calling_thread_tok_s": statistics.median(calling), "engine_thread_tok_s": statistics.median(engine),
    }  # fmt: skip
    result["ratio"] = result["engine_thread_tok_s"] / result["calling_thread_tok_s"]
    print(f"CPU: {result['cpu']} ({result['isa']}), {result['threads']} threads; {result['weights']}")
    print(f"batch-1 decode, LLM (calling thread):    {result['calling_thread_tok_s']:.1f} tok/s")
    print(f"batch-1 decode, AsyncLLM (engine thread): {result['engine_thread_tok_s']:.1f} tok/s")
    print(f"ratio {result['ratio']:.2f} (target >= 0.95)")
    write_json(args.output, result)


if __name__ == "__main__":
    main()
