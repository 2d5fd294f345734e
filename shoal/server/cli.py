"""`shoal serve` (the OpenAI-compatible server) and `shoal batch` (offline JSONL batch jobs)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.cli_args import add_engine_arguments, engine_options_from_args
from shoal.engine.protocol import EngineClient
from shoal.errors import ShoalError
from shoal.server.batch_jobs import DEFAULT_MAX_LINE_BYTES
from shoal.server.state import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_REQUEST_BYTES, ServerConfig

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "shoal"


def register(subparsers: Any) -> None:
    """Add the `serve` and `batch` subcommands to the main `shoal` parser."""
    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a Batch API")
    serve.add_argument(
        "model_path",
        nargs="?",
        metavar="MODEL",
        help="the model to serve, as `vllm serve MODEL` takes it (or --model)",
    )
    add_engine_arguments(serve)
    add_serve_arguments(serve)
    add_ray_arguments(serve)
    serve.add_argument(
        "--min-replicas", type=int, default=None, help="with --ray: autoscale down to this many"
    )
    serve.add_argument("--max-replicas", type=int, default=None, help="with --ray: autoscale up to this many")
    serve.set_defaults(func=serve_command)

    batch = subparsers.add_parser("batch", help="answer a JSONL file of OpenAI batch lines, resumably")
    batch.add_argument("input", type=Path, help="JSONL: {custom_id, method, url, body} per line")
    batch.add_argument("-o", "--output", type=Path, required=True, help="JSONL output; re-runs append to it")
    batch.add_argument(
        "--error-file", type=Path, default=None, help="failed lines go here (default: the output)"
    )
    batch.add_argument("--concurrency", type=int, default=64, help="lines in flight (default 64)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_line_limit_argument(batch)
    add_ray_arguments(batch)
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
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"larger request bodies get 413; file uploads are not limited (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    parser.add_argument(
        "--max-header-bytes",
        type=int,
        default=DEFAULT_MAX_HEADER_BYTES,
        help=f"larger request headers get 431 (default {DEFAULT_MAX_HEADER_BYTES})",
    )
    add_line_limit_argument(parser)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray (pip install 'shoal[ray]')")
    group.add_argument(
        "--ray",
        metavar="ADDRESS|local",
        default=None,
        help="run on a Ray cluster at ADDRESS ('auto' for the one this machine joined), or 'local' to start one here",
    )
    group.add_argument(
        "--replicas", type=int, default=1, help="engines (Ray actors), each with its own weights"
    )
    # --num-threads (an engine option) is each replica's torch threads and CPUs; default 1 with --ray


def add_line_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        help="batch input lines longer than this fail alone with code line_too_long "
        f"(default {DEFAULT_MAX_LINE_BYTES})",
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_names=(args.model,) if args.model else (),
        api_key=args.api_key or None,
        max_waiting=args.max_waiting,
        max_n=args.max_n,
        data_dir=args.data_dir,
        batch_concurrency=args.batch_concurrency,
        max_request_bytes=args.max_request_bytes,
        max_header_bytes=args.max_header_bytes,
        max_line_bytes=args.max_line_bytes,
    )


async def serve(engine_factory: Callable[[], EngineClient], args: argparse.Namespace) -> None:
    """Lock the data dir (before anything else, so a second server on it stops at once), load the engine,
    bind the port, then start the Batch API worker; serve until SIGINT/SIGTERM, which drain first."""
    from shoal.server.app import build_app, make_server
    from shoal.server.batch_store import BatchStore

    store = BatchStore(args.data_dir)
    try:
        engine = engine_factory()
    except BaseException:
        store.close()
        raise
    app = build_app(engine, server_config(args), store)
    level = _log_level(args)
    server = make_server(
        app,
        args.host,
        args.port,
        log_level=level,
        timeout_graceful_shutdown=int(args.drain_timeout),
        access_log=level == "debug",
    )
    await server.serve()


def _load_engine(args: argparse.Namespace) -> Callable[[], EngineClient]:
    def factory() -> EngineClient:
        from shoal.engine.async_llm import AsyncLLM

        return AsyncLLM(model=args.model, **engine_options_from_args(args))

    return factory


def _log_level(args: argparse.Namespace) -> str:
    return str(getattr(args, "log_level", "info")).lower()


def resolve_model_argument(args: argparse.Namespace) -> None:
    """`shoal serve MODEL` and `shoal serve --model MODEL` alike; both, naming two models, is an error."""
    if args.model_path is None:
        return
    if args.model not in (None, args.model_path):
        raise ShoalError(f"two models given ({args.model_path} and --model {args.model}); give one of them")
    args.model = args.model_path


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=_log_level(args).upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        resolve_model_argument(args)
        if args.ray:
            _ray_server(args).run()
            return 0
        asyncio.run(serve(_load_engine(args), args))
    except ShoalError as e:
        print(f"shoal serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


async def _batch(args: argparse.Namespace) -> Any:
    from shoal.server.batch_jobs import local_answerer, run_file
    from shoal.server.serving import OpenAIServing

    names = (args.model,) if args.model else ()
    if args.ray:
        pool = _replica_pool(args, names)
        answer, stop = pool.answer, _async(pool.stop)
    else:
        engine = _load_engine(args)()
        answer, stop = local_answerer(OpenAIServing(engine, names)), engine.shutdown
    try:
        return await run_file(
            answer,
            args.input,
            args.output,
            args.error_file,
            args.concurrency,
            show_progress=not args.no_progress,
            max_line_bytes=args.max_line_bytes,
        )
    finally:
        await stop()


def _ray_server(args: argparse.Namespace) -> Any:
    from shoal.ray import connect
    from shoal.ray.serving import RayServer

    connect(args.ray)
    options = {k: v for k, v in engine_options_from_args(args).items() if k != "num_threads"}
    return RayServer(
        args.model, options, server_config(args), args.host, args.port, args.replicas, args.num_threads or 1,
        args.min_replicas, args.max_replicas,
    )  # fmt: skip


def _replica_pool(args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    from shoal.ray import ReplicaPool, connect

    threads = args.num_threads or 1
    connect(args.ray, num_cpus=None)
    options = {k: v for k, v in engine_options_from_args(args).items() if k != "num_threads"}
    print(f"starting {args.replicas} replicas of {threads} thread(s) on Ray ({args.ray})", file=sys.stderr)
    return ReplicaPool(args.model, options, args.replicas, threads, names).start()


def _async(function: Callable[[], None]) -> Callable[[], Any]:
    async def call() -> None:
        function()

    return call


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
