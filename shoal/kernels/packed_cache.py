"""Packed weights saved once, mapped by every later load: the C kernels' layout of a GGUF file written to a
file next to it (or under ~/.cache/shoal/packed when its folder is read-only), keyed by the file's content,
the kernel build and this code. A later load maps it copy-on-write and never writes to it, so it takes no
conversion time and every process on the machine (Ray replicas, several servers) shares one copy of the
weights in the page cache.

The file: 8 bytes of header length, the JSON header (one entry per packed matrix, in the order the model
packs them: what it was packed from, then its parts' fields and tensors' dtype, shape and offset), then the
tensors, each 64-byte aligned."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.kernels.cpu import PackedWeight
from shoal.kernels.formats import QuantizedTensor, Weight

logger = logging.getLogger("shoal")
FORMAT_VERSION = 1
TENSORS = ("quants", "scales", "mins", "high", "super_scales", "super_mins", "bias")
FIELDS = ("n", "k", "format", "group", "zero")
ALIGN = 64
MADV_POPULATE_READ = 22  # Linux 5.14+; Python 3.11's mmap module does not name it
# The code whose change changes the layout: part of the key.
LAYOUT_SOURCES = ("cpu.py", "formats.py", "packed_cache.py", "gemm.c", "kernels.h")


def signature(parts: list[Weight], bias: torch.Tensor | None) -> list:
    """What a pack call is made from, to check a cached entry against."""

    def one(p: Weight) -> list:
        kind = p.ggml_type.name if isinstance(p, QuantizedTensor) else str(p.dtype)
        return [kind, list(p.shape)]

    return [[one(p) for p in parts], None if bias is None else list(bias.shape)]


def content_key(model: Path, isa: str, quantization: str) -> str:
    """The file's size and sampled content (its start, its end and 32 slices between), the kernel build,
    the conversion asked for and the layout code: a changed file or build gets a new cache."""
    digest = hashlib.blake2b(digest_size=12)
    size = model.stat().st_size
    digest.update(f"{FORMAT_VERSION} {isa} {quantization} {size}".encode())
    with open(model, "rb") as f:
        for offset in [0, max(0, size - (1 << 20))] + [size * i // 33 for i in range(1, 33)]:
            f.seek(offset)
            digest.update(f.read(1 << 20 if offset in (0, max(0, size - (1 << 20))) else 1 << 16))
    here = Path(__file__).parent
    for name in LAYOUT_SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


@dataclass
class PackedCache:
    """One model's cache file: read entry by entry when it exists, else recorded and written at the end."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    mapping: np.ndarray | None = None
    recorded: list[tuple[list, PackedWeight]] = field(default_factory=list)
    cursor: int = 0
    valid: bool = True
    data_start: int = 0  # where the tensors begin; their offsets count from here

    @classmethod
    def for_model(cls, model: Path, isa: str, quantization: str) -> PackedCache:
        key = content_key(model, isa, quantization)
        beside = model.parent / f"{model.name}.shoal-{key}.packed"
        user = (
            Path(os.environ.get("SHOAL_CACHE_DIR", Path.home() / ".cache" / "shoal"))
            / "packed"
            / f"{key}.packed"
        )
        for path in (beside, user):
            if path.is_file():
                try:
                    return cls._open(path)
                except (OSError, ValueError) as e:
                    logger.warning("ignoring the packed-weight cache %s (%s); repacking", path, e)
        writable = os.access(model.parent, os.W_OK)
        return cls(beside if writable else user)

    @classmethod
    def _open(cls, path: Path) -> PackedCache:
        mapping = np.memmap(path, mode="c")  # copy-on-write: shared with other processes, never written
        length = int(np.frombuffer(mapping[:8], dtype="<u8")[0])
        header = json.loads(bytes(mapping[8 : 8 + length]))
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {header.get('version')}")
        cache = cls(path, header["entries"], mapping, data_start=_aligned(8 + length))
        specs = [p[n] for e in cache.entries for p in e["parts"] for n in TENSORS if p.get(n)]
        end = max(
            (s["offset"] + np.dtype(s["dtype"]).itemsize * int(np.prod(s["shape"])) for s in specs), default=0
        )
        if cache.data_start + end > len(mapping):
            raise ValueError("the file is shorter than its header says (an interrupted copy?)")
        _map_pages_now(mapping)  # only once the file is known whole: one refused above is not read in full
        return cache

    @property
    def reading(self) -> bool:
        return self.mapping is not None

    def take(self, parts: list[Weight], bias: torch.Tensor | None) -> PackedWeight | None:
        """The next cached matrix, if the cache is being read and it was packed from these parts."""
        if not self.reading or not self.valid:
            return None
        entry = self.entries[self.cursor] if self.cursor < len(self.entries) else None
        if entry is None or entry["from"] != signature(parts, bias):
            logger.warning("the packed-weight cache %s does not match this model; repacking", self.path)
            self.valid = False
            return None
        self.cursor += 1
        packed = None
        for part in reversed(entry["parts"]):
            tensors = {name: self._tensor(part[name]) if part.get(name) else None for name in TENSORS}
            packed = PackedWeight(**{f: part[f] for f in FIELDS}, **tensors, next=packed)
        return packed

    def _tensor(self, spec: dict[str, Any]) -> torch.Tensor:
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"]))
        start = self.data_start + spec["offset"]
        view = self.mapping[start : start + count * dtype.itemsize]
        return torch.from_numpy(view.view(dtype).reshape(spec["shape"]))

    def record(self, parts: list[Weight], bias: torch.Tensor | None, packed: PackedWeight) -> None:
        if not self.reading:
            self.recorded.append((signature(parts, bias), packed))

    def finish(self) -> None:
        """Writes the recorded matrices (once, atomically) when this load packed them."""
        if self.reading and self.valid and self.cursor == len(self.entries):
            logger.info("weights mapped from %s (no repacking)", self.path)
            return
        if self.reading or not self.recorded:
            return
        try:
            self._write()
            logger.info("packed weights saved to %s: later loads map them", self.path)
        except OSError as e:
            logger.warning("could not save the packed-weight cache %s (%s)", self.path, e)

    def _write(self) -> None:
        blobs: list[np.ndarray] = []
        entries, offset = [], 0

        def place(t: torch.Tensor) -> dict[str, Any]:
            nonlocal offset
            array = np.ascontiguousarray(t.numpy())
            spec = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
            blobs.append(array)
            offset += _aligned(array.nbytes)
            return spec

        for source, packed in self.recorded:
            parts = []
            for part in packed.parts():
                fields = {f: getattr(part, f) for f in FIELDS}
                tensors = {n: place(t) for n in TENSORS if (t := getattr(part, n)) is not None}
                parts.append({**fields, **tensors})
            entries.append({"from": source, "parts": parts})
        header = json.dumps({"version": FORMAT_VERSION, "entries": entries}).encode()
        start = _aligned(8 + len(header))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(np.array([len(header)], dtype="<u8").tobytes() + header)
                f.write(b"\0" * (start - 8 - len(header)))
                for array in blobs:
                    f.write(array.tobytes())
                    f.write(b"\0" * (-array.nbytes % ALIGN))
            os.chmod(tmp, 0o644)  # readable by whoever can read the model
            os.replace(tmp, self.path)
            for stale in self.path.parent.glob(self.path.name.split(".shoal-")[0] + ".shoal-*.packed"):
                if stale != self.path:  # the same model's cache from an older file or build
                    stale.unlink(missing_ok=True)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _map_pages_now(mapping: np.memmap) -> None:
    """Map every page of the file into this process at load (read faults only, so the pages stay shared), as
    llama.cpp's MAP_POPULATE does: otherwise each 64 KiB is mapped on first use, which made a mixture of
    experts' first use of an expert cost about twice its read. Best effort: older kernels refuse it."""
    try:
        mapping._mmap.madvise(MADV_POPULATE_READ)
    except (AttributeError, OSError, ValueError):
        pass
