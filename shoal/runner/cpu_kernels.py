"""shoal's C kernels (GEMM, paged attention, a decoder layer's element-wise ops): compiled with the system C
compiler on first use, cached by hash.

All are batch-invariant by construction. Without a compiler (or on CUDA) the engine uses torch instead.
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
SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.c", "gemm.c", "layer_ops.c")]
HEADERS = [Path(__file__).with_name("simd_math.h")]
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
    try:
        source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    except OSError as exc:
        logger.warning("shoal's C kernel sources are missing (%s): using slower torch kernels", exc)
        return None
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
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "paged_attention_f32": [ptr, i64, *[ptr] * 6, *[i64] * 6, f32, i32],
        "pack_weight_f32": [ptr, i64, i64, ptr],
        "gemm_f32": [ptr, i64, i64, ptr, i64, ptr, ptr, i32, i32],
        "rms_norm_f32": [ptr, i64, i64, ptr, f32, ptr, i32],
        "rope_store_f32": [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i32],
        "silu_mul_f32": [ptr, i64, i64, ptr, i32],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = None, argtypes
    return lib


GEMM_PANEL = 16


def pack_weight(lib, weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight -> panels of 16 output columns, [ceil(N/16), K, 16] (zero-padded)."""
    n, k = weight.shape
    weight = weight.contiguous()
    packed = torch.empty(-(-n // GEMM_PANEL) * k * GEMM_PANEL)
    lib.pack_weight_f32(weight.data_ptr(), n, k, packed.data_ptr())
    return packed


def gemm(
    lib,
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N]; each output element is one ascending-k FMA chain. With `out`
    (contiguous [M, N]), the result is added to it in place and `out` returned: out + (x @ W^T + bias)."""
    x = x.contiguous()
    accumulate = out is not None
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
    bias_ptr = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    lib.gemm_f32(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        packed.data_ptr(),
        n,
        bias_ptr,
        out.data_ptr(),
        accumulate,
        threads,
    )
    return out


def paged_attention_c(
    lib, q, k_cache, v_cache, row_table_offset, tables, positions, scale: float, window: int = 0
) -> torch.Tensor:
    """q: [T, H, D] float32 with contiguous heads (rows may be strided, e.g. a view into the fused qkv);
    k_cache, v_cache: [NB, Hkv, B, D]; per row: its table's offset in `tables` and its position (-1: padding
    row). window > 0: each row sees only its last `window` keys (sliding-window attention). Returns [T, H, D]."""
    t, h, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    out = torch.empty(t, h, d, dtype=q.dtype)
    lib.paged_attention_f32(
        q.data_ptr(),
        q.stride(0),
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
        window,
        scale,
        torch.get_num_threads(),
    )
    return out


def rms_norm_c(lib, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, dim] contiguous -> weight * (x / sqrt(mean(x^2) + eps)), row by row."""
    out = torch.empty_like(x)
    lib.rms_norm_f32(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads()
    )
    return out


def rope_store_c(lib, qkv, cos, sin, k_cache, v_cache, slots, num_heads: int) -> None:
    """qkv [T, (H + 2 Hkv) * D] contiguous: rotates its q and k heads in place (cos, sin: [T, D] contiguous)
    and writes k and v to their slots in the caches [NB, Hkv, B, D]."""
    _, num_kv_heads, block_size, d = k_cache.shape
    lib.rope_store_f32(
        qkv.data_ptr(),
        qkv.shape[0],
        num_heads,
        num_kv_heads,
        d,
        cos.data_ptr(),
        sin.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        block_size,
        torch.get_num_threads(),
    )


def silu_mul_c(lib, gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] contiguous (gate, then up) -> silu(gate) * up, [T, I]."""
    inter = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype)
    lib.silu_mul_f32(gate_up.data_ptr(), gate_up.shape[0], inter, out.data_ptr(), torch.get_num_threads())
    return out
