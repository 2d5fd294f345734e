"""Resumable batch runs over JSONL in OpenAI's Batch API line format.

Input lines are `{"custom_id", "method": "POST", "url", "body"}`; each finished line becomes one output line
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. Output is append-only and
written one whole line at a time, so a run killed at any point can be re-run: lines already answered (by
custom_id, or by line number for lines that could not be read) are skipped. Used by `shoal batch` and by the
server's Batch API worker.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from shoal.errors import EngineDeadError, InvalidRequestError
from shoal.server.protocol import random_id
from shoal.server.serving import (
    INTERNAL_ERROR,
    REQUEST_TYPES,
    OpenAIServing,
    error_body,
    error_status,
    new_request_id,
    parse_json,
    parse_request,
)

log = logging.getLogger("shoal.server")


@dataclass
class Progress:
    total: int = 0  # lines in the input
    completed: int = 0  # lines answered 200, by this run or an earlier one
    failed: int = 0  # lines answered with an error, by this run or an earlier one
    skipped: int = 0  # lines an earlier run had answered
    prompt_tokens: int = 0  # this run
    completion_tokens: int = 0  # this run
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.monotonic() - self.started, 1e-9)


@dataclass
class DoneSet:
    """What earlier runs already answered."""

    custom_ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    completed: int = 0
    failed: int = 0

    def add(self, record: dict[str, Any]) -> None:
        error = record.get("error") or {}
        if error.get("line") is not None:
            self.lines.add(error["line"])
        else:
            self.custom_ids.add(record["custom_id"])
        if is_success(record):
            self.completed += 1
        else:
            self.failed += 1


def is_success(record: dict[str, Any]) -> bool:
    response = record.get("response") or {}
    return record.get("error") is None and response.get("status_code") == 200


DEFAULT_MAX_LINE_BYTES = 8 << 20
NO_STREAM = "stream is not supported in batch lines; remove it"


def read_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each line, with None for a line longer than max_bytes, which is skipped
    without being held in memory: memory stays bounded by max_bytes whatever the file holds."""
    with open(path, "rb") as f:
        for line_no in itertools.count(1):
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                yield line_no, None
            else:
                yield line_no, raw.decode("utf-8", errors="replace")


def count_lines(path: Path, max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> int:
    return sum(1 for _, text in read_lines(path, max_bytes) if text is None or text.strip())


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a crash left half-written, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                if pos - step + nl + 1 != end:
                    f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def scan_done(paths: list[Path]) -> DoneSet:
    done = DoneSet()
    for path in dict.fromkeys(paths):
        drop_torn_tail(path)
        for record in read_records(path):
            done.add(record)
    return done


class JsonlWriter:
    """Append-only JSONL: every record is one whole line, flushed at once; sync() makes it durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(path)
        self.file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.file.closed:
            self.sync()
            self.file.close()


def line_error(line_no: int, custom_id: Any, code: str, message: str) -> dict[str, Any]:
    cid = custom_id if isinstance(custom_id, str) else None
    error = {"code": code, "message": message, "line": line_no}
    return {"id": random_id("batch_req_"), "custom_id": cid, "response": None, "error": error}


def response_record(custom_id: str, status: int, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {"id": random_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None}


def check_line(
    line_no: int, text: str | None, endpoint: str | None, max_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(parsed line, None) for a well-formed line, (whatever parsed, error record) otherwise. `text` is None
    for a line longer than max_bytes."""
    if text is None:
        message = f"line {line_no} is longer than the limit of {max_bytes} bytes (--max-line-bytes); split it"
        return None, line_error(line_no, None, "line_too_long", message)
    try:
        obj = parse_json(text)
    except InvalidRequestError as e:
        return None, line_error(line_no, None, "invalid_json", f"line {line_no}: {e}")
    if not isinstance(obj, dict):
        return None, line_error(line_no, None, "invalid_request", f"line {line_no} must be a JSON object")
    cid = obj.get("custom_id")
    urls = [endpoint] if endpoint else list(REQUEST_TYPES)
    problems = [
        (not isinstance(cid, str) or not cid, "missing_custom_id", "custom_id must be a non-empty string"),
        (obj.get("method", "POST") != "POST", "invalid_method", "method must be POST"),
        (
            obj.get("url") not in urls,
            "invalid_url",
            f"url must be {' or '.join(urls)}, got {obj.get('url')!r}",
        ),
        (not isinstance(obj.get("body"), dict), "invalid_body", "body must be a JSON object"),
    ]
    for bad, code, message in problems:
        if bad:
            return obj, line_error(line_no, cid, code, f"line {line_no}: {message}")
    return obj, None


# Answers one well-formed batch line with its output record: (line, priority added to the line's own).
LineAnswerer = Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]


async def answer_line(serving: OpenAIServing, obj: dict[str, Any], priority: int = 0) -> dict[str, Any]:
    """The output record of one well-formed line, run on `serving`'s engine. A line's own failure is its
    record (400, or 500 for an internal error); only EngineDeadError is raised."""
    cid = obj["custom_id"]
    request_id = random_id("batch-req-")
    try:
        request = parse_request(obj["url"], obj["body"])
        if request.stream:
            raise InvalidRequestError(NO_STREAM)
        prepared = await serving.prepare(request)
        request_id = new_request_id(prepared)
        response = await serving.complete(prepared, request_id, priority + request.priority)
    except EngineDeadError:
        raise
    except InvalidRequestError as e:
        status, code = error_status(e)
        return response_record(cid, status, request_id, error_body(str(e), code=code))
    except Exception:  # one line's failure must not stop the batch; its details go to the log, not the file
        log.exception("batch line %r failed", cid)
        return response_record(cid, 500, request_id, error_body(INTERNAL_ERROR, "server_error"))
    return response_record(cid, 200, request_id, response.model_dump())


def local_answerer(serving: OpenAIServing) -> LineAnswerer:
    return functools.partial(answer_line, serving)


@dataclass
class BatchRun:
    """Runs every not-yet-answered line of `input_path` through `answer` (this process's engine, or a pool
    of replicas), `concurrency` lines at a time; only this object writes the output.

    Cancel the task running run() to stop: lines in flight are aborted and left for the next run.
    """

    answer: LineAnswerer
    input_path: Path
    output: JsonlWriter
    errors: JsonlWriter  # may be the same writer as output
    endpoint: str | None = None  # when set, every line's url must be this
    priority: int = 0  # added to each line's own priority
    concurrency: int = 64
    checkpoint_s: float = 1.0
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    on_progress: Callable[[Progress], None] | None = None
    progress: Progress = field(default_factory=Progress)

    async def run(self, done: DoneSet) -> Progress:
        """`done`: what earlier runs answered, from scan_done() over this run's output files."""
        self.progress.completed, self.progress.failed = done.completed, done.failed
        self.progress.skipped = done.completed + done.failed
        self._last_sync = time.monotonic()
        tasks: set[asyncio.Task] = set()
        lines = self._pending_lines(done)
        try:
            # Each line is read and parsed on a worker thread: a long one must not stall the event loop.
            while (item := await asyncio.to_thread(next, lines, None)) is not None:
                line_no, obj, error = item
                if error is not None:
                    self._finish(error)
                    continue
                while len(tasks) >= self.concurrency:
                    finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    _reraise(finished)
                tasks.add(asyncio.create_task(self._generate(line_no, obj)))
            while tasks:
                finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                _reraise(finished)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._checkpoint()
        return self.progress

    def _pending_lines(self, done: DoneSet) -> Iterator[tuple[int, dict[str, Any], dict[str, Any] | None]]:
        seen: set[str] = set()
        for line_no, text in read_lines(self.input_path, self.max_line_bytes):
            if text is not None and not text.strip():
                continue
            obj, error = check_line(line_no, text, self.endpoint, self.max_line_bytes)
            if error is None and obj["custom_id"] in seen:
                error = line_error(
                    line_no,
                    obj["custom_id"],
                    "duplicate_custom_id",
                    f"line {line_no}: custom_id {obj['custom_id']!r} was already used",
                )
            if error is None:
                seen.add(obj["custom_id"])
                if obj["custom_id"] not in done.custom_ids:
                    yield line_no, obj, None
            elif line_no not in done.lines:
                yield line_no, obj or {}, error

    async def _generate(self, line_no: int, obj: dict[str, Any]) -> None:
        record = await self.answer(obj, self.priority)
        if is_success(record):
            usage = record["response"]["body"].get("usage") or {}
            self.progress.prompt_tokens += usage.get("prompt_tokens", 0)
            self.progress.completion_tokens += usage.get("completion_tokens", 0)
        self._finish(record)

    def _finish(self, record: dict[str, Any]) -> None:
        ok = is_success(record)
        (self.output if ok else self.errors).write(record)
        if ok:
            self.progress.completed += 1
        else:
            self.progress.failed += 1
        if time.monotonic() - self._last_sync >= self.checkpoint_s:
            self._checkpoint()
        if self.on_progress is not None:
            self.on_progress(self.progress)

    def _checkpoint(self) -> None:
        self.output.sync()
        self.errors.sync()
        self._last_sync = time.monotonic()


def _reraise(finished: set[asyncio.Task]) -> None:
    for task in finished:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def run_file(
    answer: LineAnswerer,
    input_path: Path,
    output_path: Path,
    error_path: Path | None = None,
    concurrency: int = 64,
    show_progress: bool = True,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Progress:
    """`shoal batch`: answer every line of input_path into output_path (errors too, unless error_path is given)."""
    output = JsonlWriter(output_path)
    errors = JsonlWriter(error_path) if error_path else output
    done = scan_done([output.path, errors.path])
    total = count_lines(input_path, max_line_bytes)
    bar = tqdm(
        total=total,
        initial=done.completed + done.failed,
        unit="line",
        disable=not show_progress,
        dynamic_ncols=True,
    )

    def update(progress: Progress) -> None:
        bar.set_postfix_str(f"{progress.tokens_per_s:.1f} tok/s, {progress.failed} failed", refresh=False)
        bar.update(progress.done - bar.n)

    run = BatchRun(
        answer,
        input_path,
        output,
        errors,
        concurrency=concurrency,
        max_line_bytes=max_line_bytes,
        on_progress=update,
    )
    run.progress.total = total
    try:
        return await run.run(done)
    finally:
        bar.close()
        output.close()
        errors.close()


def summary(progress: Progress, output_path: Path, error_path: Path | None) -> str:
    elapsed = time.monotonic() - progress.started
    new = progress.done - progress.skipped
    lines = [
        f"{progress.done}/{progress.total} lines answered: {progress.completed} ok, {progress.failed} failed"
        + (f" ({progress.skipped} by an earlier run)" if progress.skipped else ""),
        f"this run: {new} lines in {elapsed:.1f}s, {progress.prompt_tokens} prompt tokens, "
        f"{progress.completion_tokens} generated tokens ({progress.tokens_per_s:.1f} tok/s)",
        f"output: {output_path}" + (f", errors: {error_path}" if error_path else ""),
    ]
    return "\n".join(lines)
