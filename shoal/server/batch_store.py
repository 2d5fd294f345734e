"""Batch API state: file and batch objects in SQLite (WAL), file contents on disk under the data dir."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import BinaryIO

from shoal.errors import ShoalError
from shoal.server.protocol import FINAL_STATUSES, Batch, FileObject

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, path TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, data TEXT NOT NULL, conversation TEXT NOT NULL);
"""


class DataDirInUseError(ShoalError):
    """Another server holds the data dir."""


class DataDirLock:
    """An exclusive lock on a data dir for as long as it is held (released by close() or at process exit,
    even kill -9). The lock file names the holder's PID."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / "server.lock"
        self.file: BinaryIO = open(path, "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().decode(errors="replace").strip() or "unknown"
            self.file.close()
            raise DataDirInUseError(
                f"the data dir {data_dir} is in use by another shoal server (PID {holder}); stop that server, "
                "or give this one its own --data-dir"
            ) from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n".encode())
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing the descriptor releases the lock


class BatchStore:
    """Every object is one JSON row; writes are single autocommitted statements. Holds the data dir's lock
    for its life, so only one server at a time runs the batches stored there."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.lock = DataDirLock(self.data_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.data_dir / "shoal.db", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    def batch_dir(self, batch_id: str) -> Path:
        return self.data_dir / "batches" / batch_id

    def close(self) -> None:
        self.db.close()
        self.lock.close()

    # ------------------------------------------------------------ stored responses (the Responses API)

    def put_response(self, response_id: str, data: str, conversation: str) -> None:
        """A response object and the conversation it ends (its input and output as chat messages), as JSON."""
        self.db.execute(
            "INSERT OR REPLACE INTO responses (id, data, conversation) VALUES (?, ?, ?)",
            (response_id, data, conversation),
        )

    def get_response(self, response_id: str) -> tuple[str, str] | None:
        row = self.db.execute(
            "SELECT data, conversation FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def delete_response(self, response_id: str) -> bool:
        return self.db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    # ------------------------------------------------------------ files

    def put_file(self, file: FileObject, path: Path) -> FileObject:
        self.db.execute(
            "INSERT INTO files (id, path, data) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET path = excluded.path, data = excluded.data",
            (file.id, str(path), file.model_dump_json()),
        )
        return file

    def get_file(self, file_id: str) -> tuple[FileObject, Path] | None:
        row = self.db.execute("SELECT data, path FROM files WHERE id = ?", (file_id,)).fetchone()
        return (FileObject.model_validate_json(row[0]), Path(row[1])) if row else None

    def list_files(self, purpose: str | None = None, limit: int = 10_000) -> list[FileObject]:
        rows = self.db.execute("SELECT data FROM files ORDER BY seq DESC").fetchall()
        files = [FileObject.model_validate_json(r[0]) for r in rows]
        return [f for f in files if purpose is None or f.purpose == purpose][:limit]

    def delete_file(self, file_id: str) -> bool:
        found = self.get_file(file_id)
        if found is None:
            return False
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        found[1].unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------ batches

    def put_batch(self, batch: Batch) -> Batch:
        self.db.execute(
            "INSERT INTO batches (id, status, data) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET status = excluded.status, data = excluded.data",
            (batch.id, batch.status, batch.model_dump_json()),
        )
        return batch

    def get_batch(self, batch_id: str) -> Batch | None:
        row = self.db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return Batch.model_validate_json(row[0]) if row else None

    def list_batches(self, limit: int = 20, after: str | None = None) -> tuple[list[Batch], bool]:
        """Newest first; `after` is the id of the last batch of the previous page."""
        start = (
            self.db.execute("SELECT seq FROM batches WHERE id = ?", (after,)).fetchone() if after else None
        )
        bound = start[0] if start else 1 << 62
        rows = self.db.execute(
            "SELECT data FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?", (bound, limit + 1)
        ).fetchall()
        batches = [Batch.model_validate_json(r[0]) for r in rows]
        return batches[:limit], len(batches) > limit

    def unfinished_batches(self) -> list[Batch]:
        """Batches still to work on, oldest first."""
        marks = ",".join("?" * len(FINAL_STATUSES))
        rows = self.db.execute(
            f"SELECT data FROM batches WHERE status NOT IN ({marks}) ORDER BY seq", FINAL_STATUSES
        ).fetchall()
        return [Batch.model_validate_json(r[0]) for r in rows]
