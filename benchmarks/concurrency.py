"""16 chat sessions with different questions: answered one after another, then all at once (asyncio.gather).

Each mode gets a fresh context (so no prefix-cache carry-over) on the same loaded model, greedy decoding,
the same max_tokens. Greedy decoding is batch-invariant, so both modes produce the same answers and the
same number of tokens; only the wall time differs. The two modes alternate for --rounds rounds (the
machine's speed drifts), and the speed-up is the ratio of the median times. Prints every round, the
medians and the speed-up; writes JSON to --output (benchmarks/results/concurrency.json).

    python benchmarks/concurrency.py [--model PATH] [--max-tokens 64] [--sessions 16] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

import torch
from machine import write_json

import shoal
from shoal.sessions import ChatSession

QUESTIONS = [
    "What is the capital of France?",
    "How much is 6+6?",
    "Why is the sky blue?",
    "Name three fruits that are red.",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "What is the largest ocean on Earth?",
    "Give me a tip for sleeping better.",
    "What language is spoken in Brazil?",
    "How many days are in a leap year?",
    "What is photosynthesis?",
    "Suggest a name for a pet cat.",
    "What is the tallest animal?",
    "How do I boil an egg?",
]
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."
KV_MEMORY = 512 << 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=len(QUESTIONS))
    parser.add_argument("--rounds", type=int, default=3, help="sequential + concurrent runs, alternated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--output", default="benchmarks/results/concurrency.json")
    return parser.parse_args()


async def answer(model: shoal.LoadedModel, questions: list[str], max_tokens: int, together: bool) -> dict:
    async with shoal.Context(model, sequences=len(questions), kv_cache_memory=KV_MEMORY) as context:
        sessions = [ChatSession(context.get_sequence(), system_prompt=SYSTEM_PROMPT) for _ in questions]
        start = time.perf_counter()
        asks = [s.prompt(q, max_tokens=max_tokens) for s, q in zip(sessions, questions, strict=True)]
        answers = list(await asyncio.gather(*asks)) if together else [await ask for ask in asks]
        seconds = time.perf_counter() - start
    generated = sum(len(s.last_turn.token_ids) for s in sessions)
    return {
        "seconds": seconds,
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds,
        "answers": answers,
    }


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = shoal.load_model(args.model)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.sessions)]
    asyncio.run(answer(model, questions[:2], 4, together=True))  # warm-up
    runs: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
    for round_ in range(1, args.rounds + 1):
        for mode in runs:
            run = asyncio.run(answer(model, questions, args.max_tokens, together=mode == "concurrent"))
            runs[mode].append(run)
            print(
                f"round {round_} {mode + ':':12s} {run['seconds']:6.2f}s  ({run['tokens_per_s']:.1f} tokens/s)"
            )
    sequential, concurrent = (median_run(runs[mode]) for mode in runs)
    speedup = sequential["seconds"] / concurrent["seconds"]
    answers = [run["answers"] for mode in runs for run in runs[mode]]
    same = all(a == answers[0] for a in answers)
    print(f"median sequential {sequential['seconds']:.2f}s, concurrent {concurrent['seconds']:.2f}s")
    print(f"speed-up:   {speedup:.1f}x   (same answers in every run: {same})")
    result = {
        "model": model.name,
        "sessions": len(questions),
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "rounds": args.rounds,
        "sequential": {k: v for k, v in sequential.items() if k != "answers"},
        "concurrent": {k: v for k, v in concurrent.items() if k != "answers"},
        "seconds": {mode: [run["seconds"] for run in runs[mode]] for mode in runs},
        "speedup": speedup,
        "same_answers": same,
    }
    write_json(args.output, result)


if __name__ == "__main__":
    main()
