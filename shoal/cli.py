"""`shoal generate | serve | batch`: the command line over the same engine."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable

from shoal.cli_args import add_engine_arguments, engine_options_from_args
from shoal.errors import ShoalError
from shoal.sampling_params import SamplingParams
from shoal.server.cli import register as register_server_commands

EXAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "Give three tips for learning a new language.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci.",
    "Why do cats purr?",
    "Suggest a name for a friendly robot.",
]


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from arguments, a file (one per line, or JSONL with "prompt"), stdin, else the built-in examples."""
    if args.prompts:
        return list(args.prompts)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                return _parse_lines(f)
        except OSError as e:
            raise ShoalError(f"cannot read --file {args.file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ShoalError(f"--file {args.file} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    from_stdin = [] if sys.stdin is None or sys.stdin.isatty() else _parse_lines(sys.stdin)
    return from_stdin or list(EXAMPLE_PROMPTS)


def _parse_lines(lines: Iterable[str]) -> list[str]:
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ShoalError(
                    f"line {number}: not valid JSON ({e}); use one prompt per line or JSONL"
                ) from e
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ShoalError(f'line {number}: a JSONL line needs a "prompt" field holding a string')
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from shoal.llm import LLM

    prompts = read_prompts(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
    )
    llm = LLM(args.model, **engine_options_from_args(args))
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    for prompt, out in zip(prompts, outputs, strict=True):
        if args.jsonl:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": out.outputs[0].text,
                        "finish_reason": out.outputs[0].finish_reason,
                    }
                )
            )
        else:
            print(f"### {prompt}\n{out.outputs[0].text.strip()}\n")
    print(
        f"{len(prompts)} prompts, {generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="A batched LLM inference engine.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate for prompts from arguments, a file or stdin")
    gen.add_argument("prompts", nargs="*", help="prompts (default: read --file, stdin, or built-in examples)")
    gen.add_argument("--file", "-f", help="one prompt per line, or JSONL with a prompt field")
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap each prompt in the model's chat template (default on; --no-chat for raw completion)",
    )
    gen.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    add_engine_arguments(gen)
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    register_server_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ShoalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
