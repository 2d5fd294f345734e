"""One round of three agents sharing one model: a planner plans, an analyzer and an executor work on the
plan at the same time, and the planner revises it. Each agent is a chat session on its own sequence; the
planner's second turn reuses the KV of its first.

    python examples/multi_agent.py [--model PATH] [--max-tokens N] [--task TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import os

import shoal
from shoal import ChatSession

AGENTS = {
    "planner": "You are a planner. Break the task into three short numbered steps.",
    "analyzer": "You are an analyst. Name the biggest risk in the plan you are given, in two sentences.",
    "executor": "You carry out plans. Say concretely how you would do the first step of the plan you are given.",
}
TASK = "Organize a bake sale at school to raise money for new library books."


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
    parser.add_argument("--task", default=TASK)
    return parser.parse_args(argv)


def show(name: str, session: ChatSession, text: str) -> None:
    turn = session.last_turn
    print(
        f"[{name}] ({turn.num_computed_prompt_tokens} prompt tokens computed, {turn.num_cached_tokens} reused)"
    )
    print(text.strip(), "\n")


async def one_round(model: shoal.LoadedModel, task: str, max_tokens: int) -> dict[str, str]:
    async with shoal.Context(model, sequences=len(AGENTS), kv_cache_memory=256 << 20) as context:
        agents = {
            name: ChatSession(context.get_sequence(), system_prompt=role) for name, role in AGENTS.items()
        }
        planner, analyzer, executor = agents.values()

        plan = await planner.prompt(f"Task: {task}", max_tokens=max_tokens)
        show("planner", planner, plan)

        analysis, action = await asyncio.gather(
            analyzer.prompt(f"Task: {task}\nPlan:\n{plan}", max_tokens=max_tokens),
            executor.prompt(f"Task: {task}\nPlan:\n{plan}", max_tokens=max_tokens),
        )
        show("analyzer", analyzer, analysis)
        show("executor", executor, action)

        revised = await planner.prompt(
            f"The analyst says: {analysis}\nThe executor says: {action}\nRevise your plan.",
            max_tokens=max_tokens,
        )
        show("planner, revised", planner, revised)
        return {"plan": plan, "analysis": analysis, "action": action, "revised": revised}


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    return asyncio.run(one_round(shoal.load_model(args.model), args.task, args.max_tokens))


if __name__ == "__main__":
    main()
