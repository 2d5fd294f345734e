"""A small streaming multipart/form-data reader: form fields into memory, the file part straight to disk.

Enough for OpenAI's `POST /v1/files` (fields `purpose` and `file`); uploads larger than memory are fine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from shoal.errors import InvalidRequestError

MAX_FIELD_BYTES = 1 << 16


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # set when a file part was saved
    size: int = 0


def _boundary(content_type: str) -> bytes:
    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if msg.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise InvalidRequestError("send the file as multipart/form-data with fields 'file' and 'purpose'")
    return boundary.encode("latin-1")


def _disposition(headers: bytes) -> tuple[str, str | None]:
    msg = Message()
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        name, _, value = line.partition(":")
        if value:
            msg[name.strip()] = value.strip()
    name = msg.get_param("name", header="content-disposition")
    if not isinstance(name, str):
        raise InvalidRequestError("a multipart part has no name")
    return name, msg.get_filename()


class _Parser:
    def __init__(self, boundary: bytes, file_field: str, dest: Path) -> None:
        self.sep = b"\r\n--" + boundary
        self.file_field = file_field
        self.dest = dest
        self.buffer = b"\r\n"  # so the first boundary looks like every other one
        self.state = "preamble"
        self.sink: BinaryIO | None = None
        self.field_name = ""
        self.field_value = b""
        self.upload = Upload()

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while self._step():
            pass

    def _step(self) -> bool:
        if self.state == "preamble":
            i = self.buffer.find(self.sep)
            if i < 0:
                self.buffer = self.buffer[-len(self.sep) :]
                return False
            self.buffer = self.buffer[i + len(self.sep) :]
            self.state = "after_sep"
        elif self.state == "after_sep":
            if len(self.buffer) < 2:
                return False
            self.state = "end" if self.buffer.startswith(b"--") else "headers"
            self.buffer = self.buffer[2:] if self.state == "headers" else b""
        elif self.state == "headers":
            i = self.buffer.find(b"\r\n\r\n")
            if i < 0:
                return False
            self._open_part(self.buffer[:i])
            self.buffer = self.buffer[i + 4 :]
            self.state = "data"
        elif self.state == "data":
            return self._data()
        return self.state != "end"

    def _open_part(self, headers: bytes) -> None:
        name, filename = _disposition(headers)
        self.field_name, self.field_value = name, b""
        if name == self.file_field:
            self.upload.filename = filename or "upload.jsonl"
            self.sink = open(self.dest, "wb")  # noqa: SIM115 - closed at the part's end

    def _data(self) -> bool:
        i = self.buffer.find(self.sep)
        keep = len(self.buffer) if i >= 0 else max(len(self.buffer) - len(self.sep) + 1, 0)
        self._write(self.buffer[: i if i >= 0 else keep])
        if i < 0:
            self.buffer = self.buffer[keep:]
            return False
        self.buffer = self.buffer[i + len(self.sep) :]
        self._close_part()
        self.state = "after_sep"
        return True

    def _write(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.write(data)
            self.upload.size += len(data)
            return
        self.field_value += data
        if len(self.field_value) > MAX_FIELD_BYTES:
            raise InvalidRequestError(f"form field {self.field_name!r} is too large")

    def _close_part(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        else:
            self.upload.fields[self.field_name] = self.field_value.decode("utf-8", "replace")

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.state != "end":
            raise InvalidRequestError("the multipart body ended early; send the whole file")


async def save_upload(stream: AsyncIterator[bytes], content_type: str, file_field: str, dest: Path) -> Upload:
    """Parse a multipart body, writing the part named `file_field` to `dest`."""
    parser = _Parser(_boundary(content_type), file_field, dest)
    try:
        async for chunk in stream:
            parser.feed(chunk)
    finally:
        parser.close()
    return parser.upload
