"""The C paged-attention kernel: compiled with the system C compiler on first use, cached by source hash.

Without a compiler (or on CUDA) the engine uses the torch implementation in attention.py instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("shoal")
SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def _cache_dir() -> Path:
    base = os.environ.get("SHOAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "shoal"
    )
    return Path(base).expanduser()


def _cpu_signature() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


@cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be built here (then torch's path is used)."""
    if os.environ.get("SHOAL_DISABLE_C_KERNEL") == "1":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning(
            "no C compiler found: using the slower torch attention (install gcc for the fast kernel)"
        )
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    library = _cache_dir() / f"paged_attention-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            result = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True
            )
            if result.returncode != 0:
                logger.warning(
                    "building the C attention kernel failed, using torch attention:\n%s", result.stderr
                )
                return None
            os.replace(built, library)  # atomic: concurrent builders do not see half a file
    lib = ctypes.CDLL(str(library))
    lib.paged_attention_f32.restype = None
    lib.paged_attention_f32.argtypes = (
        [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    )
    return lib


def paged_attention_c(lib, q, k_cache, v_cache, row_table_offset, tables, positions, scale) -> torch.Tensor:
    """q: [T, H, D] float32 contiguous; k_cache, v_cache: [NB, Hkv, B, D]; per row: its table's offset in
    `tables` and its position (-1: padding row). Returns [T, H, D]."""
    t, h, d = q.shape
    out = torch.empty_like(q)
    lib.paged_attention_f32(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        row_table_offset.data_ptr(),
        tables.data_ptr(),
        positions.data_ptr(),
        t,
        h,
        k_cache.shape[1],
        d,
        k_cache.shape[2],
        scale,
        torch.get_num_threads(),
    )
    return out
