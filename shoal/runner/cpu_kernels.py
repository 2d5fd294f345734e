"""shoal's C kernels (paged attention, GEMM): compiled with the system C compiler on first use, cached by hash.

Both are batch-invariant by construction. Without a compiler (or on CUDA) the engine uses torch instead.
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
SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.c", "gemm.c")]
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
    """The compiled kernels, or None when they cannot be built here (then torch's paths are used)."""
    if os.environ.get("SHOAL_DISABLE_C_KERNEL") == "1":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning(
            "no C compiler found: using slower torch kernels (install gcc for shoal's CPU kernels)"
        )
        return None
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    library = _cache_dir() / f"shoal-kernels-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                logger.warning("building shoal's C kernels failed, using torch instead:\n%s", result.stderr)
                return None
            os.replace(built, library)  # atomic: concurrent builders never load half a file
    lib = ctypes.CDLL(str(library))
    lib.paged_attention_f32.restype = None
    lib.paged_attention_f32.argtypes = (
        [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    )
    lib.pack_weight_f32.restype = None
    lib.pack_weight_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.gemm_f32.restype = None
    lib.gemm_f32.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return lib


GEMM_PANEL = 16


def pack_weight(lib, weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight -> panels of 16 output columns, [ceil(N/16), K, 16] (zero-padded)."""
    n, k = weight.shape
    weight = weight.contiguous()
    packed = torch.empty(-(-n // GEMM_PANEL) * k * GEMM_PANEL)
    lib.pack_weight_f32(weight.data_ptr(), n, k, packed.data_ptr())
    return packed


def gemm(lib, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N]; each output element is one ascending-k FMA chain."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    lib.gemm_f32(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        packed.data_ptr(),
        n,
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


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
