"""Two chat sessions on one context, answered in parallel: both are decoded in the same engine steps.

python examples/parallel_chat.py [--model PATH] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import shoal
from shoal import ChatSession

QUESTIONS = ["Hi there, how are you?", "How much is 6+6?"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=int(os.environ.get("SHOAL_EXAMPLE_MAX_TOKENS", 128))
    )
    return parser.parse_args(argv)


async def ask_both(model: shoal.LoadedModel, max_tokens: int) -> list[str]:
    async with shoal.Context(model, sequences=len(QUESTIONS), kv_cache_memory=256 << 20) as context:
        sessions = [
            ChatSession(context.get_sequence(), system_prompt="You are a friendly assistant.")
            for _ in QUESTIONS
        ]
        return await asyncio.gather(
            *(s.prompt(q, max_tokens=max_tokens) for s, q in zip(sessions, QUESTIONS, strict=True))
        )


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    model = shoal.load_model(args.model)
    start = time.perf_counter()
    answers = asyncio.run(ask_both(model, args.max_tokens))
    for question, answer in zip(QUESTIONS, answers, strict=True):
        print(f"User: {question}\nAI:   {answer.strip()}\n")
    print(f"both answered in {time.perf_counter() - start:.1f}s")
    return answers


if __name__ == "__main__":
    main()
