"""The same prompts answered three ways: one after another, concurrently (chat sessions under
asyncio.gather), and as one batch (generate_batch). Greedy decoding is batch-invariant in shoal, so all
three give the same answers; only the wall time differs.

    python examples/timing.py [--model PATH] [--max-tokens N] [--prompts N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import shoal
from shoal import ChatSession, generate_batch

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "How many legs does a spider have?",
    "What do bees make?",
    "Why is the sky blue?",
    "What is 12 times 12?",
    "Name a planet with rings.",
    "What language is spoken in Brazil?",
]
KV_MEMORY = 256 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--max-tokens", type=int, default=int(os.environ.get("SHOAL_EXAMPLE_MAX_TOKENS", 48)))
    parser.add_argument(
        "--prompts", type=int, default=len(QUESTIONS), help=f"how many questions (1..{len(QUESTIONS)})"
    )
    return parser.parse_args(argv)


async def with_sessions(
    model: shoal.LoadedModel, questions: list[str], max_tokens: int, concurrent: bool
) -> list[str]:
    async with shoal.Context(model, sequences=len(questions), kv_cache_memory=KV_MEMORY) as context:
        sessions = [ChatSession(context.get_sequence()) for _ in questions]
        asks = [s.prompt(q, max_tokens=max_tokens) for s, q in zip(sessions, questions, strict=True)]
        if concurrent:
            return list(await asyncio.gather(*asks))
        return [await ask for ask in asks]


def batched(model: shoal.LoadedModel, questions: list[str], max_tokens: int) -> list[str]:
    llm = shoal.LLM(model, kv_cache_memory=KV_MEMORY)
    prompts = [model.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    return generate_batch(llm, prompts, max_tokens=max_tokens, temperature=0)


def timed(label: str, run) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = run()
    seconds = time.perf_counter() - start
    print(f"{label:<12} {seconds:7.2f}s")
    return seconds, answers


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    model = shoal.load_model(args.model)
    questions = QUESTIONS[: max(1, args.prompts)]
    batched(model, questions[:1], 2)  # warm-up
    print(f"{len(questions)} prompts, up to {args.max_tokens} new tokens each")
    seq_s, seq = timed(
        "sequential", lambda: asyncio.run(with_sessions(model, questions, args.max_tokens, False))
    )
    con_s, con = timed(
        "concurrent", lambda: asyncio.run(with_sessions(model, questions, args.max_tokens, True))
    )
    bat_s, bat = timed("batched", lambda: batched(model, questions, args.max_tokens))
    print(f"speed-up over sequential: concurrent {seq_s / con_s:.1f}x, batched {seq_s / bat_s:.1f}x")
    print("same answers in all three:", seq == con == bat)
    print(f"\nQ: {questions[0]}\nA: {seq[0].strip()}")
    return {"sequential": seq_s, "concurrent": con_s, "batched": bat_s}


if __name__ == "__main__":
    main()
