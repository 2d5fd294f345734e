"""Weight formats: GGUF blocks as stored, their lossless integer form, and conversions between formats.

A quantized matrix W [N, K] is kept as integers q with a float32 scale s (and optionally an offset m) per
group of k, so that each weight is `s * (q - zero) + m`, computed in float32 as gguf's own dequantize
computes it (the product rounded, then the sum). Every GGUF type shoal keeps maps onto a layout of its own
size, without loss:

| GGUF type | layout | group | weight |
|---|---|---|---|
| Q8_0 | q8 | 32 | d * q |
| Q4_0 | q4, zero 8 | 32 | d * (q - 8) |
| Q4_1 | q4 + offset | 32 | d * q + m |
| Q4_K | q4 + offset | 32 | (d * sc) * q - (dmin * mn) |
| Q5_0 | q5, zero 16 | 32 | d * (q - 16) |
| Q5_1, Q5_K | q5 + offset | 32 | as Q4_1, Q4_K with 5-bit q |
| Q6_K | q6, zero 32 | 16 | (d * sc) * (q - 32) |
| Q2_K | q2 + offset | 16 | (d * sc) * q - (dmin * mn) |
| Q3_K | q3, zero 4 | 16 | (d * (sc - 32)) * (q - 4) |

q5 and q6 are q4's nibbles plus one or two high bits per value; q3 is q2's pairs of bits plus one high bit.
F16, BF16 and F32 stay as they are. Other GGUF types (the IQ* family, ...) are dequantized to float32 at
load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

logger = logging.getLogger("shoal")
QK_K = 256


@dataclass
class QuantizedTensor:
    """A GGUF matrix as the file stores it: for each of its `shape[0]` rows, that row's blocks."""

    data: np.ndarray  # uint8 [rows, bytes per row]; may be a view into the memory-mapped file
    ggml_type: T
    shape: tuple[int, int]  # (rows N, columns K), Hugging Face order
    # Drops the file's pages of this matrix from memory once a back end holds its own copy (they are read
    # from the file again if touched); set by a loader that maps the file.
    release: Callable[[], None] = lambda: None

    def dequantize(self) -> np.ndarray:
        return dequantize(self.data, self.ggml_type).reshape(self.shape)

    def row_range(self, start: int, stop: int) -> QuantizedTensor:
        """Rows start..stop, still as stored (a view of the same blocks)."""
        return QuantizedTensor(
            self.data[start:stop], self.ggml_type, (stop - start, self.shape[1]), self.release
        )


@dataclass
class ScaleFactors:
    """K-quants' two-level scales, kept as the file has them: each group's scale is super * sub (and its
    offset super_min * sub_min), one float32 product, as gguf computes it; super per 256 values of k."""

    sub: np.ndarray  # int8 [N, K / group]
    super: np.ndarray  # float32 [N, K / 256], each value exact in float16
    sub_min: np.ndarray | None = None  # int8 [N, K / group]
    super_min: np.ndarray | None = None  # float32 [N, K / 256] (minus the file's dmin), exact in float16

    def rows(self, n: int) -> ScaleFactors:
        """Per row of the matrix, from per block (n rows)."""

        def each(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(a.reshape(n, -1))

        return ScaleFactors(each(self.sub), each(self.super), each(self.sub_min), each(self.super_min))

    @staticmethod
    def join(parts: list[ScaleFactors | None]) -> ScaleFactors | None:
        """Of matrices of one layout: all factored alike, or none."""
        if parts[0] is None:
            return None

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return ScaleFactors(cat("sub"), cat("super"), cat("sub_min"), cat("super_min"))


def _factors(super_: np.ndarray, sub: np.ndarray, super_min=None, sub_min=None) -> ScaleFactors:
    """[blocks, 1] float32 supers and [blocks, groups] small-integer subs (as float32 or int)."""

    def small(a):
        return None if a is None else a.astype(np.int8)

    return ScaleFactors(small(sub), super_.reshape(-1, 1), small(sub_min), super_min)


@dataclass
class IntWeights:
    """W = s * (q - zero) (+ m) per group of `group` k values: q [N, K], int8 values for bits 8, unsigned
    values below 2**bits for bits 2 to 6."""

    q: np.ndarray
    scales: np.ndarray  # float32 [N, K / group]
    mins: np.ndarray | None  # float32 [N, K / group], added after scaling
    group: int
    bits: int  # 8, 6, 5, 4, 3 or 2
    zero: int = 0  # subtracted from each value (bits 2 to 6)
    factors: ScaleFactors | None = None  # how the scales and offsets are made, for K-quants

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        q = (self.q.astype(np.int16) - self.zero).astype(np.float32).reshape(self.q.shape[0], -1, self.group)
        values = q * self.scales[..., None]
        if self.mins is not None:
            values = values + self.mins[..., None]
        return values.reshape(self.q.shape)


Weight = torch.Tensor | QuantizedTensor  # what loaders hand to a back end for one matrix


# ---- GGUF blocks -> integer form (the arithmetic of gguf.quants' dequantize_blocks, kept unexpanded) ----


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32]: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """[blocks, 4] bytes of a little-endian uint32 -> [blocks, 32] bits."""
    bits = np.ascontiguousarray(qh).view(np.uint32) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's twelve bytes -> eight 6-bit scales and eight 6-bit mins per block."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 128] -> [blocks, 8, 32]: each 32-byte chunk gives a sub-block of low, then of high nibbles."""
    chunks = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & 0x0F).reshape(-1, 8, 32)


def _decode_blocks(ggml_type: T, b: np.ndarray) -> IntWeights:
    """b: [blocks, block bytes] -> integer form with one row per block."""
    if ggml_type == T.Q8_0:
        return IntWeights(b[:, 2:].view(np.int8), _f16(b[:, :2]), None, 32, 8)
    if ggml_type == T.Q4_0:
        return IntWeights(_nibbles_32(b[:, 2:]), _f16(b[:, :2]), None, 32, 4, zero=8)
    if ggml_type == T.Q4_1:
        return IntWeights(_nibbles_32(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4]), 32, 4)
    if ggml_type in (T.Q5_0, T.Q5_1):
        offset = 2 if ggml_type == T.Q5_0 else 4
        q = _nibbles_32(b[:, offset + 4 :]) | (_high_bits_32(b[:, offset : offset + 4]) << 4)
        if ggml_type == T.Q5_0:
            return IntWeights(q, _f16(b[:, :2]), None, 32, 5, zero=16)
        return IntWeights(q, _f16(b[:, :2]), _f16(b[:, 2:4]), 32, 5)
    if ggml_type in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scales(b[:, 4:16])
        scales, mins = (d * sc).reshape(-1, 8), -(dmin * mn).reshape(-1, 8)
        factors = _factors(d, sc, -dmin, mn)
        if ggml_type == T.Q4_K:
            return IntWeights(_k_nibbles(b[:, 16:]).reshape(-1, QK_K), scales, mins, 32, 4, 0, factors)
        qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = _k_nibbles(b[:, 48:]) | ((qh & 1) << 4)
        return IntWeights(q.reshape(-1, QK_K), scales, mins, 32, 5, 0, factors)
    if ggml_type == T.Q6_K:
        ql, qh = b[:, :128], b[:, 128:192]
        scales, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
        low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)
        return IntWeights(q.reshape(-1, QK_K), d * scales, None, 16, 6, 32, _factors(d, scales))
    if ggml_type == T.Q2_K:
        scales, qs = b[:, :16], b[:, 16:80]
        d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
        q = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        sc, mn = (scales & 0x0F).astype(np.float32), (scales >> 4).astype(np.float32)
        return IntWeights(q.reshape(-1, QK_K), d * sc, -(dmin * mn), 16, 2, 0, _factors(d, sc, -dmin, mn))
    if ggml_type == T.Q3_K:
        hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
        low = (packed[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(
            -1, 16
        )
        high = (
            packed[:, 8:].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
        ).reshape(-1, 16)
        sc = (((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int16) - 32).astype(np.float32)
        ql = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        qh = (hmask.reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
        q = ql.reshape(-1, QK_K) + (qh.reshape(-1, QK_K) << 2)  # q - 4 * (1 - high bit), stored plus 4
        return IntWeights(q.astype(np.uint8), d * sc, None, 16, 3, 4, _factors(d, sc))
    raise ValueError(f"no integer form for {ggml_type.name}")


INTEGER_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def integer_form(t: QuantizedTensor) -> IntWeights:
    """The matrix's integer form, rows of blocks joined back into rows of the matrix."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[t.ggml_type]
    rows, cols = t.shape
    w = _decode_blocks(t.ggml_type, np.ascontiguousarray(t.data).reshape(-1, size))
    mins = None if w.mins is None else w.mins.reshape(rows, -1)
    factors = None if w.factors is None else w.factors.rows(rows)
    q, scales = w.q.reshape(rows, cols), w.scales.reshape(rows, -1)
    return IntWeights(q, scales, mins, w.group, w.bits, w.zero, factors)


def float_form(t: QuantizedTensor) -> torch.Tensor:
    """An F32/F16/BF16 GGUF matrix as a torch tensor of its own dtype (no conversion)."""
    raw = np.ascontiguousarray(t.data)
    if t.ggml_type == T.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(t.shape).copy())
    values = torch.from_numpy(raw.view(np.int16).reshape(t.shape).copy())
    return values.view(FLOAT_TYPES[t.ggml_type])


@cache
def _log_once(message: str) -> None:
    logger.info(message)


def kept_form(weight: Weight) -> IntWeights | torch.Tensor:
    """What a CPU kernel keeps for one matrix: the integer form, or a float tensor of the stored dtype."""
    if isinstance(weight, torch.Tensor):
        return weight
    if weight.ggml_type in FLOAT_TYPES:
        return float_form(weight)
    if weight.ggml_type in INTEGER_TYPES:
        return integer_form(weight)
    _log_once(f"{weight.ggml_type.name} has no kernel in shoal: converting those weights to float32 at load")
    return torch.from_numpy(weight.dequantize())


def _layout(part: IntWeights | torch.Tensor) -> tuple:
    if isinstance(part, torch.Tensor):
        return ("float",)
    factors = part.factors
    return (
        part.bits,
        part.zero,
        part.group,
        part.mins is None,
        factors is None,
        factors and factors.sub_min is None,
    )


def layout_runs(parts: list[IntWeights | torch.Tensor]) -> list[IntWeights | torch.Tensor]:
    """Matrices stacked along N (fused q/k/v or gate/up) as runs of one layout each, neighbours of the same
    layout joined: each part keeps its own size (a Q6_K v beside Q4_K q and k stays q6, they q4). Float parts
    among quantized ones make one float run."""
    if any(isinstance(p, torch.Tensor) for p in parts):
        return [join_rows(parts)]
    runs: list[list[IntWeights]] = []
    for part in parts:
        if runs and _layout(runs[-1][-1]) == _layout(part):
            runs[-1].append(part)
        else:
            runs.append([part])
    return [join_rows(run) for run in runs]


def join_rows(parts: list[IntWeights | torch.Tensor]) -> IntWeights | torch.Tensor:
    """Matrices of one layout stacked along N (a run of layout_runs), exactly; or, when some are float,
    every part as a float tensor of their common dtype (float32 if they differ)."""
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, torch.Tensor) for p in parts):
        tensors = [p if isinstance(p, torch.Tensor) else torch.from_numpy(p.dequantize()) for p in parts]
        dtypes = {t.dtype for t in tensors}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        return torch.cat([t.to(dtype) for t in tensors])
    assert len({_layout(p) for p in parts}) == 1, "join_rows takes one layout; see layout_runs"
    first = parts[0]
    mins = None if first.mins is None else np.concatenate([p.mins for p in parts])
    q, scales = np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts])
    factors = ScaleFactors.join([p.factors for p in parts])
    return IntWeights(q, scales, mins, first.group, first.bits, first.zero, factors)


# ---- converting at load: the `quantization` option ----

QUANTIZATIONS = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "q8_0": T.Q8_0,
    "q4_0": T.Q4_0,
    "q4_1": T.Q4_1,
}
ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "bf16": "bfloat16"}


def canonical_quantization(name: str) -> str:
    name = ALIASES.get(str(name).lower(), str(name).lower())
    if name not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)} (or f32, f16, bf16), got {name!r}"
        )
    return name


def convert(weight: Weight, quantization: str) -> Weight:
    """One matrix converted to the asked format (as stored for "auto"); K must be a multiple of 32 to quantize."""
    target = QUANTIZATIONS[quantization]
    if target is None:
        return weight
    if isinstance(target, torch.dtype):
        if isinstance(weight, torch.Tensor):
            return weight.to(target)
        if weight.ggml_type in FLOAT_TYPES and FLOAT_TYPES[weight.ggml_type] == target:
            return weight
        return torch.from_numpy(weight.dequantize()).to(target)
    if isinstance(weight, QuantizedTensor) and weight.ggml_type == target:
        return weight
    values = weight.float().numpy() if isinstance(weight, torch.Tensor) else weight.dequantize()
    if values.shape[1] % 32:
        _log_once(f"a matrix with {values.shape[1]} columns cannot be {quantization}: kept as float32")
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return QuantizedTensor(
        quantize(np.ascontiguousarray(values, dtype=np.float32), target), target, values.shape
    )
