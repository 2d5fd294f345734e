"""`shoal serve` (the OpenAI-compatible server) and `shoal batch` (offline JSONL batch jobs)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from shoal.cli_args import add_engine_arguments, engine_options_from_args
from shoal.engine.protocol import EngineClient
from shoal.errors import ShoalError

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "shoal"


def register(subparsers: Any) -> None:
    """Add the `serve` and `batch` subcommands to the main `shoal` parser."""
    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a Batch API")
    add_engine_arguments(serve)
    add_serve_arguments(serve)
    serve.set_defaults(func=serve_command)

    batch = subparsers.add_parser("batch", help="answer a JSONL file of OpenAI batch lines, resumably")
    batch.add_argument("input", type=Path, help="JSONL: {custom_id, method, url, body} per line")
    batch.add_argument("-o", "--output", type=Path, required=True, help="JSONL output; re-runs append to it")
    batch.add_argument(
        "--error-file", type=Path, default=None, help="failed lines go here (default: the output)"
    )
    batch.add_argument("--concurrency", type=int, default=64, help="lines in flight (default 64)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(batch)
    batch.set_defaults(func=batch_command)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="(default 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SHOAL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $SHOAL_API_KEY)",
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests waiting for a first token before answering 503 (default 256)",
    )
    parser.add_argument("--max-n", type=int, default=16, help="largest n (samples per prompt) accepted")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"Batch API files and state (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--batch-concurrency", type=int, default=32, help="Batch API lines in flight (default 32)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM"
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, with the app told first so it refuses new work at once."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.on_exit)
        super().handle_exit(sig, frame)


def server_config(args: argparse.Namespace) -> Any:
    from shoal.server.app import ServerConfig

    return ServerConfig(
        model_names=(args.model,) if args.model else (),
        api_key=args.api_key or None,
        max_waiting=args.max_waiting,
        max_n=args.max_n,
        data_dir=args.data_dir,
        batch_concurrency=args.batch_concurrency,
    )


def make_server(engine: EngineClient, args: argparse.Namespace) -> DrainingServer:
    from shoal.server.app import build_app

    app = build_app(engine, server_config(args))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=_log_level(args),
        timeout_graceful_shutdown=int(args.drain_timeout),
        access_log=_log_level(args) == "debug",
    )
    return DrainingServer(config, on_exit=app.state.shoal.begin_drain)


async def serve(engine_factory: Callable[[], EngineClient], args: argparse.Namespace) -> None:
    """Load the engine, then serve until SIGINT/SIGTERM (which drain in-flight requests first)."""
    engine = engine_factory()
    await make_server(engine, args).serve()


def _load_engine(args: argparse.Namespace) -> Callable[[], EngineClient]:
    def factory() -> EngineClient:
        from shoal.engine.async_llm import AsyncLLM

        return AsyncLLM(model=args.model, **engine_options_from_args(args))

    return factory


def _log_level(args: argparse.Namespace) -> str:
    return str(getattr(args, "log_level", "info")).lower()


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=_log_level(args).upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(_load_engine(args), args))
    except ShoalError as e:
        print(f"shoal serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


async def _batch(args: argparse.Namespace) -> Any:
    from shoal.server.batch_jobs import run_file
    from shoal.server.serving import OpenAIServing

    engine = _load_engine(args)()
    try:
        serving = OpenAIServing(engine, (args.model,) if args.model else ())
        return await run_file(
            serving,
            args.input,
            args.output,
            args.error_file,
            args.concurrency,
            show_progress=not args.no_progress,
        )
    finally:
        await engine.shutdown()


def batch_command(args: argparse.Namespace) -> int:
    from shoal.server.batch_jobs import summary

    if not args.input.is_file():
        print(f"shoal batch: no input file {args.input}", file=sys.stderr)
        return 2
    try:
        progress = asyncio.run(_batch(args))
    except KeyboardInterrupt:
        print(
            "\ninterrupted: every finished line is saved; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except ShoalError as e:
        print(f"shoal batch: {e}", file=sys.stderr)
        return 2
    print(summary(progress, args.output, args.error_file), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m shoal.server.cli serve|batch ...`, the same commands without the main `shoal` CLI."""
    parser = argparse.ArgumentParser(prog="shoal")
    parser.add_argument("--log-level", default="info")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
