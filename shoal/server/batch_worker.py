"""Runs Batch API batches one at a time, at low priority, resuming whatever a crash or restart interrupted.

Status flow (OpenAI's): validating -> in_progress -> finalizing -> completed, or -> failed (unreadable input),
cancelling -> cancelled, expired (the 24h window passed). Line results go to append-only files under the
batch's folder, so a restarted server continues exactly where the files end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from shoal.errors import EngineDeadError
from shoal.server.batch_jobs import (
    DEFAULT_MAX_LINE_BYTES,
    BatchRun,
    DoneSet,
    JsonlWriter,
    LineAnswerer,
    Progress,
    count_lines,
    scan_done,
)
from shoal.server.batch_store import BatchStore
from shoal.server.protocol import Batch, BatchError, BatchErrors, FileObject, now

log = logging.getLogger("shoal.server.batch")


@dataclass
class BatchWorker:
    store: BatchStore
    answer: LineAnswerer  # this process's engine, or replicas elsewhere
    priority: int = 10  # added to every line's priority; interactive requests default to 0
    concurrency: int = 32  # lines in flight
    checkpoint_s: float = 1.0
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)
    _current: tuple[str, asyncio.Task] | None = field(default=None, init=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop at once; lines in flight are aborted and redone on the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        if self._current is not None and self._current[0] == batch_id:
            self._current[1].cancel()
        self.notify()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            for batch in self.store.unfinished_batches():
                try:
                    await self._process(batch.id)
                except EngineDeadError:
                    log.exception("the engine stopped; batch %s resumes on the next start", batch.id)
                    return
                except Exception as e:
                    log.exception("batch %s failed", batch.id)
                    self._fail(batch, "internal_error", f"the batch stopped on an internal error: {e!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=60)

    async def _process(self, batch_id: str) -> None:
        batch = self.store.get_batch(batch_id)
        if batch is None:
            return
        if batch.status == "validating":
            batch = await self._validate(batch)
        if batch.status == "in_progress":
            batch = await self._run(batch)
        if batch.status in ("finalizing", "cancelling", "expired"):
            await self._finalize(batch)

    async def _validate(self, batch: Batch) -> Batch:
        found = self.store.get_file(batch.input_file_id)
        if found is None or not found[1].exists():
            return self._fail(batch, "missing_file", f"input file {batch.input_file_id} does not exist")
        total = await asyncio.to_thread(count_lines, found[1], self.max_line_bytes)
        if total == 0:
            return self._fail(batch, "empty_file", "the input file has no lines")
        return self._update(batch.id, status="in_progress", in_progress_at=now(), total=total)

    async def _run(self, batch: Batch) -> Batch:
        found = self.store.get_file(batch.input_file_id)
        if found is None or not found[1].exists():
            return self._fail(batch, "missing_file", f"input file {batch.input_file_id} is gone")
        folder = self.store.batch_dir(batch.id)
        output, errors = JsonlWriter(folder / "output.jsonl"), JsonlWriter(folder / "errors.jsonl")
        try:
            done = await asyncio.to_thread(
                scan_done, [output.path, errors.path]
            )  # big files: off the event loop
            run = BatchRun(
                self.answer, found[1], output, errors, endpoint=batch.endpoint, priority=self.priority,
                concurrency=self.concurrency, checkpoint_s=self.checkpoint_s, max_line_bytes=self.max_line_bytes,
                on_progress=lambda p: self._save_counts(batch.id, p),
            )  # fmt: skip
            return await self._execute(batch, run, done)
        finally:
            output.close()
            errors.close()

    async def _execute(self, batch: Batch, run: BatchRun, done: DoneSet) -> Batch:
        if (self.store.get_batch(batch.id) or batch).status == "cancelling":
            return self.store.get_batch(batch.id) or batch
        task = asyncio.create_task(run.run(done))
        self._current = (batch.id, task)
        timeout = max((batch.expires_at or now() + 86_400) - now(), 0)
        try:
            await asyncio.wait_for(task, timeout=timeout)
            return self._update(batch.id, status="finalizing", finalizing_at=now())
        except TimeoutError:
            return self._update(batch.id, status="expired", expired_at=now())
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the worker is stopping, not the batch
                raise
            return self.store.get_batch(batch.id) or batch  # cancelled by the user: status is cancelling
        finally:
            self._current = None

    async def _finalize(self, batch: Batch) -> None:
        folder = self.store.batch_dir(batch.id)
        done = await asyncio.to_thread(scan_done, [folder / "output.jsonl", folder / "errors.jsonl"])
        batch = self.store.get_batch(batch.id) or batch
        output_id = self._register(batch, folder / "output.jsonl", "output") if done.completed else None
        error_id = self._register(batch, folder / "errors.jsonl", "errors") if done.failed else None
        final = {"finalizing": ("completed", "completed_at"), "cancelling": ("cancelled", "cancelled_at")}
        status, stamp = final.get(batch.status, (batch.status, "expired_at"))
        batch = self._apply_counts(batch, done)
        batch = batch.model_copy(
            update={"status": status, stamp: now(), "output_file_id": output_id, "error_file_id": error_id}
        )
        self.store.put_batch(batch)
        log.info("batch %s %s: %s", batch.id, status, batch.request_counts)

    def _register(self, batch: Batch, path: Path, kind: str) -> str:
        # A fixed id per batch and kind, so finalizing twice (after a crash) registers the file once.
        file = FileObject(
            id=f"file-{batch.id.removeprefix('batch_')}-{kind}",
            bytes=path.stat().st_size if path.exists() else 0,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output",
        )
        return self.store.put_file(file, path).id

    def _fail(self, batch: Batch, code: str, message: str) -> Batch:
        errors = BatchErrors(data=[BatchError(code=code, message=message)])
        return self._update(batch.id, status="failed", failed_at=now(), errors=errors)

    def _save_counts(self, batch_id: str, progress: Progress) -> None:
        batch = self.store.get_batch(batch_id)
        if batch is not None:
            counts = batch.request_counts.model_copy(
                update={"completed": progress.completed, "failed": progress.failed}
            )
            self.store.put_batch(batch.model_copy(update={"request_counts": counts}))

    @staticmethod
    def _apply_counts(batch: Batch, done: DoneSet) -> Batch:
        counts = batch.request_counts.model_copy(update={"completed": done.completed, "failed": done.failed})
        return batch.model_copy(update={"request_counts": counts})

    def _update(self, batch_id: str, total: int | None = None, **changes: object) -> Batch:
        """Read-modify-write of one batch row (no await in between, so it cannot interleave)."""
        batch = self.store.get_batch(batch_id)
        assert batch is not None
        if batch.status == "cancelling" and changes.get("status") not in (None, "cancelled"):
            changes.pop("status")  # a cancel that arrived meanwhile wins
        if total is not None:
            changes["request_counts"] = batch.request_counts.model_copy(update={"total": total})
        return self.store.put_batch(batch.model_copy(update=changes))
