"""The Batch API routes (/v1/files, /v1/batches): uploads, batches, their state in the BatchStore."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from shoal.errors import InvalidRequestError
from shoal.server.batch_store import BatchStore
from shoal.server.multipart import save_upload
from shoal.server.protocol import (
    FINAL_STATUSES,
    Batch,
    BatchCreateRequest,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
    now,
    random_id,
)
from shoal.server.serving import parse_body
from shoal.server.state import APIError, get_state, read_json, refuse_if_draining


def batch_routes() -> APIRouter:
    """/v1/files and /v1/batches: the Batch API, when the server has a --data-dir."""
    router = APIRouter()

    def store_of(request: Request) -> BatchStore:
        store = get_state(request).store
        if store is None:
            raise APIError(404, "the Batch API is off: start the server with --data-dir")
        return store

    @router.post("/v1/files")
    async def upload_file(request: Request) -> FileObject:
        store = store_of(request)
        refuse_if_draining(get_state(request))
        file_id = random_id("file-")
        dest = store.files_dir / f"{file_id}.jsonl"
        try:
            upload = await save_upload(
                request.stream(), request.headers.get("content-type", ""), "file", dest
            )
            purpose = upload.fields.get("purpose")
            if upload.filename is None:
                raise InvalidRequestError("the upload has no 'file' part")
            if purpose != "batch":
                raise InvalidRequestError(
                    f"purpose must be 'batch' (the only kind of file this server keeps), got {purpose!r}"
                )
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        file = FileObject(id=file_id, bytes=upload.size, filename=upload.filename, purpose=purpose)
        return store.put_file(file, dest)

    @router.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None) -> FileList:
        return FileList(data=store_of(request).list_files(purpose))

    @router.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> FileObject:
        return _find_file(store_of(request), file_id)[0]

    @router.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> FileResponse:
        file, path = _find_file(store_of(request), file_id)
        return FileResponse(path, media_type="application/jsonl", filename=file.filename)

    @router.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> FileDeleted:
        if not store_of(request).delete_file(file_id):
            raise APIError(404, f"no file with id {file_id!r}")
        return FileDeleted(id=file_id)

    @router.post("/v1/batches")
    async def create_batch(request: Request) -> Batch:
        state, store = get_state(request), store_of(request)
        refuse_if_draining(state)
        body = parse_body(BatchCreateRequest, await read_json(request))
        file, _ = _find_file(store, body.input_file_id)
        if file.purpose != "batch":
            raise InvalidRequestError(
                f"file {file.id} has purpose {file.purpose!r}; upload the input with purpose 'batch'"
            )
        created = now()
        batch = Batch(
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
            model=state.model_name,
            created_at=created,
            expires_at=created + 86_400,
        )
        store.put_batch(batch)
        assert state.worker is not None
        state.worker.notify()
        return batch

    @router.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> BatchList:
        batches, more = store_of(request).list_batches(max(1, min(limit, 100)), after)
        first, last = (batches[0].id, batches[-1].id) if batches else (None, None)
        return BatchList(data=batches, first_id=first, last_id=last, has_more=more)

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str) -> Batch:
        return _find_batch(store_of(request), batch_id)

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Batch:
        state, store = get_state(request), store_of(request)
        batch = _find_batch(store, batch_id)
        if batch.status in FINAL_STATUSES and batch.status != "cancelled":
            raise APIError(
                409, f"batch {batch_id} is already {batch.status}; only unfinished batches can be cancelled"
            )
        if batch.status in ("validating", "in_progress", "finalizing"):
            batch = store.put_batch(batch.model_copy(update={"status": "cancelling", "cancelling_at": now()}))
            assert state.worker is not None
            state.worker.cancel(batch_id)
        return batch

    return router


def _find_file(store: BatchStore, file_id: str) -> tuple[FileObject, Path]:
    found = store.get_file(file_id)
    if found is None or not found[1].exists():
        raise APIError(404, f"no file with id {file_id!r}")
    return found


def _find_batch(store: BatchStore, batch_id: str) -> Batch:
    batch = store.get_batch(batch_id)
    if batch is None:
        raise APIError(404, f"no batch with id {batch_id!r}")
    return batch
