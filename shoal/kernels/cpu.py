"""Python bindings of shoal's C kernels, and packing weights into the panel layout they read (gemm.c)."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from shoal.kernels.formats import IntWeights, QuantizedTensor, kept_form

PANEL = 16
FORMATS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FORMAT_Q8, FORMAT_Q4, FORMAT_Q5, FORMAT_Q6, FORMAT_Q2, FORMAT_Q3 = 3, 4, 5, 6, 7, 8
FACTORS_4BIT = 2  # kernels.h: K-quant factors of 4 bits, a scale's and an offset's in one byte
INT_FORMATS = {8: FORMAT_Q8, 4: FORMAT_Q4, 5: FORMAT_Q5, 6: FORMAT_Q6, 2: FORMAT_Q2, 3: FORMAT_Q3}  # by bits
FORMAT_NAMES = {0: "float32", 1: "float16", 2: "bfloat16", **{f: f"q{b}" for b, f in INT_FORMATS.items()}}


class _PackedStruct(ctypes.Structure):
    _fields_ = [
        ("format", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("has_min", ctypes.c_int32),
        ("half_scales", ctypes.c_int32),
        ("zero", ctypes.c_int32),
        ("factored", ctypes.c_int32),
        ("int8_x", ctypes.c_int32),
        ("quants", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("mins", ctypes.c_void_p),
        ("high", ctypes.c_void_p),
        ("super_scales", ctypes.c_void_p),
        ("super_mins", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("next", ctypes.c_void_p),
    ]


class _LayerStruct(ctypes.Structure):
    """layer.c's struct decoder_layer."""

    _fields_ = [
        ("qkv", _PackedStruct),
        ("o", _PackedStruct),
        ("gate_up", _PackedStruct),
        ("down", _PackedStruct),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("num_heads", ctypes.c_int64),
        ("num_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("window", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("router", ctypes.c_void_p),
        ("experts", ctypes.c_void_p),
        ("top_k", ctypes.c_int64),
        ("normalize", ctypes.c_int32),
    ]


class _StepStruct(ctypes.Structure):
    """layer.c's struct step."""

    _fields_ = [
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
        ("row_table_offset", ctypes.c_void_p),
        ("tables", ctypes.c_void_p),
        ("positions", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("kv_type", ctypes.c_int32),
    ]


class _ExpertGroupStruct(ctypes.Structure):
    """experts.c's struct expert_group."""

    _fields_ = [
        ("gate_up", ctypes.c_void_p),
        ("down", ctypes.c_void_p),
        ("num_experts", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("inter", ctypes.c_int64),
        ("activation", ctypes.c_int32),
    ]


KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # kernels.h's enum activation


@dataclass(eq=False)
class PackedWeight:
    """W [n, k] in the panel layout, with its bias; `struct` is what the C side reads. `next` continues it
    along n in another format (parts of different GGUF types stacked, as q/k/v): n counts this part only."""

    n: int
    k: int
    format: int
    quants: torch.Tensor
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    group: int = 0
    bias: torch.Tensor | None = None
    high: torch.Tensor | None = None  # q5, q6 (q3): the bits above each value's nibble (its 2 low bits)
    zero: int = 0  # q2 to q6: subtracted from each value
    # factored: scales (and mins) are int8, or uint8 pairs of 4-bit factors, times these (float16)
    super_scales: torch.Tensor | None = None
    super_mins: torch.Tensor | None = None
    next: PackedWeight | None = None
    struct: _PackedStruct = field(init=False)

    def __post_init__(self) -> None:
        def address(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        half = self.scales is not None and self.scales.dtype == torch.float16
        factored = 0 if self.super_scales is None else FACTORS_4BIT if self.scales.dtype == torch.uint8 else 1
        has_min = self.mins is not None or self.super_mins is not None
        self.struct = _PackedStruct(
            self.format, self.group, int(has_min), int(half), self.zero, factored, 0,
            address(self.quants), address(self.scales), address(self.mins), address(self.high),
            address(self.super_scales), address(self.super_mins), address(self.bias), self.n, self.k,
            None if self.next is None else ctypes.addressof(self.next.struct),
        )  # fmt: skip

    def parts(self) -> list[PackedWeight]:
        return [self] + ([] if self.next is None else self.next.parts())

    @property
    def columns(self) -> int:
        return sum(part.n for part in self.parts())

    @property
    def nbytes(self) -> int:
        return sum(part.own_bytes for part in self.parts())

    @property
    def own_bytes(self) -> int:
        tensors = (
            self.quants,
            self.scales,
            self.mins,
            self.high,
            self.super_scales,
            self.super_mins,
            self.bias,
        )
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def format_name(self) -> str:
        return "+".join(FORMAT_NAMES[part.format] for part in self.parts())

    def take_int8_activations(self) -> None:
        """Its integer parts multiply x quantized to int8 (gemm_int8.c) from now on; float parts, and groups
        other than 16 or 32 k, keep float32 arithmetic."""
        for part in self.parts():
            if part.format >= FORMAT_Q8 and part.k % 32 == 0 and part.group in (16, 32):
                part.struct.int8_x = 1

    @property
    def int8_activations(self) -> bool:
        return any(part.struct.int8_x for part in self.parts())


def _panels(a: np.ndarray) -> np.ndarray:
    """[N, K] -> [P, K, 16] with P a multiple of 4, zero-padded past N."""
    n = a.shape[0]
    p = -(-n // PANEL)
    p += -p % 4
    padded = np.zeros((p * PANEL, *a.shape[1:]), dtype=a.dtype)
    padded[:n] = a
    return np.ascontiguousarray(padded.reshape(p, PANEL, -1).transpose(0, 2, 1))


def _half_if_exact(scales: np.ndarray, mins: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 copies when they hold every value exactly (GGUF's d and m are float16; K-quants' d * sc is not)."""
    arrays = [a for a in (scales, mins) if a is not None]
    halves = [a.astype(np.float16) for a in arrays]
    if not all(np.array_equal(h.astype(np.float32), a) for h, a in zip(halves, arrays, strict=True)):
        return scales, mins
    return halves[0], halves[1] if mins is not None else None


CHUNK_ROWS = 8192  # a multiple of 64: chunks of whole units of panels
CHUNKED = ("quants", "scales", "mins", "high", "super_scales", "super_mins")  # per panel, along dim 0


def pack_in_chunks(weight: QuantizedTensor, bias: torch.Tensor | None = None) -> PackedWeight:
    """A stored matrix packed CHUNK_ROWS rows at a time into tensors made once, its file pages let go
    chunk by chunk: a large embedding costs one chunk's conversion on top of its packed size, not the
    several copies of the whole matrix that packing it at once takes."""
    n = weight.shape[0]
    whole: PackedWeight | None = None
    at = 0
    for start in range(0, n, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, n))
        part = QuantizedTensor(weight.data[rows], weight.ggml_type, (rows.stop - start, weight.shape[1]))
        chunk = pack_weight(kept_form(part))
        if whole is None:
            if rows.stop == n:  # one chunk: the matrix itself
                whole = chunk
                break
            panels = -(-n // PANEL)
            panels += -panels % 4
            made = {
                name: torch.empty((panels, *t.shape[1:]), dtype=t.dtype)
                for name in CHUNKED
                if (t := getattr(chunk, name)) is not None
            }
            whole = replace(chunk, n=n, **made)
        for name in CHUNKED:
            if (t := getattr(chunk, name)) is not None:
                getattr(whole, name)[at : at + t.shape[0]] = t
        at += chunk.quants.shape[0]
        weight.release()  # the pages read so far
    weight.release()
    assert whole is not None
    return whole if bias is None else replace(whole, bias=bias.to(torch.float32).contiguous())


def pack_parts(parts: list[IntWeights | torch.Tensor], bias: torch.Tensor | None = None) -> PackedWeight:
    """Matrices stacked along n, each in its own layout (from formats.layout_runs), as one packed weight."""
    packed: PackedWeight | None = None
    end = sum(p.shape[0] for p in parts)
    for part in reversed(parts):
        start = end - part.shape[0]
        part_bias = None if bias is None else bias[start:end]
        packed = pack_weight(part, part_bias, packed)
        end = start
    assert packed is not None
    return packed


def pack_weight(
    weight: IntWeights | torch.Tensor, bias: torch.Tensor | None = None, next: PackedWeight | None = None
) -> PackedWeight:
    """A matrix in its kept form (see formats.kept_form) -> the kernels' panel layout."""
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    if isinstance(weight, torch.Tensor):
        n, k = weight.shape
        if weight.dtype not in FORMATS:
            weight = weight.to(torch.float32)
        values = (
            weight.contiguous().view(torch.int16) if weight.dtype != torch.float32 else weight.contiguous()
        )
        quants = torch.from_numpy(_panels(values.numpy()))
        return PackedWeight(n, k, FORMATS[weight.dtype], quants, bias=bias, next=next)
    n, k = weight.shape
    q, high, zero = _panels(weight.q), None, 0
    if weight.bits in (2, 3):
        if weight.bits == 3:  # the bit above each pair, 8 to a byte
            high = _packed_along_k(q >> 2, 1, 8)
        q = _packed_along_k(q & 3, 2, 4)
    elif weight.bits in (4, 5, 6):
        if weight.bits > 4:
            high = _packed_along_k(_in_fours(q >> 4), weight.bits - 4, 8 // (weight.bits - 4), 4)
        q = _packed_along_k(_in_fours(q & 15), 4, 2, 4)
    if weight.bits != 8:
        assert not (weight.zero and weight.mins is not None), "the kernels take offsets or a zero, not both"
        zero = weight.zero
    quants = torch.from_numpy(np.ascontiguousarray(q))
    high = None if high is None else torch.from_numpy(np.ascontiguousarray(high))
    scales, mins, supers = _scales(weight)
    return PackedWeight(
        n, k, INT_FORMATS[weight.bits], quants, scales, mins, weight.group, bias, high, zero, *supers, next
    )


def _packed_along_k(values: np.ndarray, bits: int, per: int, stride: int = 1) -> np.ndarray:
    """[..., K, X] small integers -> [..., K / per, X] bytes: of each run of per * stride values along K, value
    j * stride + i goes to byte i at bit j * bits."""
    *lead, k, x = values.shape
    runs = values.astype(np.uint8).reshape(*lead, k // (per * stride), per, stride, x)
    packed = sum(runs[..., j, :, :] << (j * bits) for j in range(per)).astype(np.uint8)
    return packed.reshape(*lead, k // per, x)


def _in_fours(a: np.ndarray) -> np.ndarray:
    """[P, K, 16] -> [P, K / 4, 16, 4] read as [P, K, 16]: each column's 4 consecutive k side by side (the
    [16 columns][4 k] bytes an int8 dot product takes), so that packing runs of 4 rows keeps that order."""
    p, k, c = a.shape
    return np.ascontiguousarray(a.reshape(p, k // 4, 4, c).transpose(0, 1, 3, 2)).reshape(p, k, c)


def _scales(weight: IntWeights) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """Scales and offsets in panels: as their int8 factors and float16 supers where the matrix has them
    (K-quants: as small as the file holds them; the supers are the file's float16 values), else each value
    in float16 where that is exact, or float32."""
    factors = weight.factors
    if factors is not None:

        def panels(a: np.ndarray | None, dtype: type) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(_panels(a.astype(dtype, copy=False)))

        supers = (panels(factors.super, np.float16), panels(factors.super_min, np.float16))
        if factors.sub_min is not None and _fits_4_bits(factors.sub) and _fits_4_bits(factors.sub_min):
            both = factors.sub.astype(np.uint8) | (factors.sub_min.astype(np.uint8) << 4)  # Q2_K's own bytes
            return panels(both, np.uint8), None, supers
        return panels(factors.sub, np.int8), panels(factors.sub_min, np.int8), supers
    scales, mins = _half_if_exact(weight.scales, weight.mins)
    mins = None if mins is None else torch.from_numpy(_panels(mins))
    return torch.from_numpy(_panels(scales)), mins, (None, None)


def _fits_4_bits(a: np.ndarray) -> bool:
    return bool(((a >= 0) & (a < 16)).all())


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the C functions' signatures on a freshly loaded library."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "gemm": [ptr, i64, ptr, ptr, i32, i32],
        "gather_columns": [ptr, ptr, i64, ptr],
        "rms_norm_f32": [ptr, i64, i64, ptr, f32, ptr, i32],
        "rope_store_f32": [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i32, ptr, i64, i32],
        "gated_mul_f32": [ptr, i64, i64, i32, ptr, i32],
        "head_norm_f32": [ptr, i64, i64, i64, i64, ptr, ptr, f32, i32],
        "attention_f32": [
            ptr,
            i64,
            ptr,
            ptr,
            i32,
            ptr,
            ptr,
            ptr,
            ptr,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            f32,
            i32,
        ],
        "decoder_layer_f32": [ptr, ptr, ptr, ptr, ptr, ptr, i32],
        "expert_group_f32": [ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i32],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = None, argtypes
    lib.decoder_layer_scratch.restype, lib.decoder_layer_scratch.argtypes = i64, [ptr, i64, i32]
    lib.expert_group_scratch.restype, lib.expert_group_scratch.argtypes = i64, [ptr, i64, i64, i32]
    lib.route_tokens.restype, lib.route_tokens.argtypes = i64, [ptr, i64, i64, i64, i32, ptr, ptr, ptr]
    return lib


def gemm(lib, x: torch.Tensor, w: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N]; each output element is one ascending-k FMA chain. With `out`
    (contiguous [M, N]), the result is added to it in place and `out` returned: out + (x @ W^T + bias)."""
    x = x.contiguous()
    accumulate = out is not None
    if out is None:
        out = torch.empty(x.shape[0], w.columns, dtype=torch.float32)
    lib.gemm(
        x.data_ptr(), x.shape[0], ctypes.byref(w.struct), out.data_ptr(), accumulate, torch.get_num_threads()
    )
    return out


def gather_columns(lib, w: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of W, dequantized: an embedding lookup in a packed (possibly tied) table."""
    ids = ids.contiguous()
    out = torch.empty(ids.shape[0], w.k, dtype=torch.float32)
    lib.gather_columns(ctypes.byref(w.struct), ids.data_ptr(), ids.shape[0], out.data_ptr())
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
        qkv.data_ptr(), qkv.shape[0], num_heads, num_kv_heads, d, cos.data_ptr(), sin.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), KV_TYPES[k_cache.dtype], slots.data_ptr(), block_size,
        torch.get_num_threads(),
    )  # fmt: skip


def gated_activation_c(lib, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate_up [T, 2 I] contiguous (gate, then up) -> act(gate) * up, [T, I]; act "silu" or "gelu_tanh"."""
    inter = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype)
    lib.gated_mul_f32(
        gate_up.data_ptr(),
        gate_up.shape[0],
        inter,
        ACTIVATIONS[activation],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def head_norm_c(lib, qkv, q_norm, k_norm, num_heads: int, num_kv_heads: int, eps: float) -> None:
    """RMSNorm of each q and k head of qkv [T, (H + 2 Hkv) * D] (contiguous), in place."""
    d = q_norm.shape[0]
    lib.head_norm_f32(
        qkv.data_ptr(), qkv.shape[0], num_heads, num_kv_heads, d, q_norm.data_ptr(), k_norm.data_ptr(), eps,
        torch.get_num_threads(),
    )  # fmt: skip


def attention_c(lib, qkv, k_cache, v_cache, meta, num_heads: int, scale: float, window: int) -> torch.Tensor:
    """Paged attention of qkv's q heads (its k and v already in the caches [NB, Hkv, B, D]): [T, H * D]."""
    _, num_kv_heads, block_size, d = k_cache.shape
    out = torch.empty(qkv.shape[0], num_heads * d, dtype=torch.float32)
    lib.attention_f32(
        qkv.data_ptr(), qkv.shape[1], k_cache.data_ptr(), v_cache.data_ptr(), KV_TYPES[k_cache.dtype],
        out.data_ptr(), meta.row_table_offset.data_ptr(), meta.tables.data_ptr(), meta.row_positions.data_ptr(),
        qkv.shape[0], num_heads, num_kv_heads, d, block_size, window, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out


def plan_layer(layer) -> _LayerStruct:
    """A backend.PreNormLayer as layer.c reads it (the tensors and structs it points to are kept alive by the
    model)."""
    norms = (layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm)
    h, moe = layer.heads, layer.experts
    mlp = (_PackedStruct(), _PackedStruct()) if moe else (layer.gate_up.struct, layer.down.struct)
    return _LayerStruct(
        layer.qkv.struct, layer.o.struct, *mlp, *(None if t is None else t.data_ptr() for t in norms),
        h.num_heads, h.num_kv_heads, h.head_dim, layer.window, layer.eps, layer.scale,
        ctypes.addressof(moe.router.struct) if moe else None, ctypes.addressof(moe.group.struct) if moe else None,
        moe.top_k if moe else 0, int(moe.normalize) if moe else 0,
    )  # fmt: skip


def step_struct(
    meta, cos: torch.Tensor, sin: torch.Tensor, block_size: int, kv_dtype: torch.dtype
) -> _StepStruct:
    return _StepStruct(
        cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(), meta.row_table_offset.data_ptr(),
        meta.tables.data_ptr(), meta.row_positions.data_ptr(), meta.row_positions.shape[0], block_size,
        KV_TYPES[kv_dtype],
    )  # fmt: skip


class Workspace:
    """Scratch kept from call to call, one buffer per calling thread (two engines may share a model), as large
    as the largest step has needed (about 100 MB for a 512-token chunk of an 8B model). A fresh buffer past
    glibc's mmap threshold (32 MiB at most) is mapped anew at every call and each of its pages faulted in:
    that cost 6-8% of a 512-token prefill, dense or mixture of experts."""

    def __init__(self) -> None:
        self._local = threading.local()

    def floats(self, count: int) -> torch.Tensor:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < count:
            buffer = self._local.buffer = torch.empty(count)
        return buffer


def decoder_layer(
    lib, plan: _LayerStruct, x: torch.Tensor, step: _StepStruct, k_cache, v_cache, workspace: Workspace
) -> torch.Tensor:
    """layer.c's whole decoder layer on x [T, hidden] (contiguous float32), in place; returns x."""
    threads = torch.get_num_threads()
    scratch = workspace.floats(lib.decoder_layer_scratch(ctypes.byref(plan), x.shape[0], threads))
    lib.decoder_layer_f32(
        ctypes.byref(plan), x.data_ptr(), ctypes.byref(step), k_cache.data_ptr(), v_cache.data_ptr(),
        scratch.data_ptr(), threads,
    )  # fmt: skip
    return x


@dataclass(eq=False)
class ExpertGroup:
    """A layer's experts as experts.c reads them: arrays of their packed gate/up and down matrices."""

    gate_ups: list[PackedWeight]
    downs: list[PackedWeight]
    activation: str
    struct: _ExpertGroupStruct = field(init=False)

    def __post_init__(self) -> None:
        def addresses(weights: list[PackedWeight]) -> ctypes.Array:
            return (ctypes.c_void_p * len(weights))(*(ctypes.addressof(w.struct) for w in weights))

        self._arrays = addresses(self.gate_ups), addresses(self.downs)  # kept alive with the struct
        hidden, inter = self.downs[0].columns, self.downs[0].k
        self.struct = _ExpertGroupStruct(
            ctypes.addressof(self._arrays[0]), ctypes.addressof(self._arrays[1]), len(self.downs), hidden,
            inter, ACTIVATIONS[self.activation],
        )  # fmt: skip


def route_tokens(
    lib, logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """experts.c's router: (rows, weights, starts, the most assignments of one expert) from logits [T, E]."""
    logits = logits.float().contiguous()
    tokens, experts = logits.shape
    rows = torch.empty(tokens * top_k, dtype=torch.int64)
    weights = torch.empty(tokens * top_k)
    starts = torch.empty(experts + 1, dtype=torch.int64)
    most = lib.route_tokens(
        logits.data_ptr(), tokens, experts, top_k, int(normalize), rows.data_ptr(), weights.data_ptr(),
        starts.data_ptr(),
    )  # fmt: skip
    return rows, weights, starts, most


def expert_group(
    lib,
    group: ExpertGroup,
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    starts: torch.Tensor,
    most: int,
) -> torch.Tensor:
    """experts.c: each row's experts' weighted outputs summed (x [T, hidden] contiguous float32; rows, starts
    int64 and weights float32 as backend.Routing has them; most: the most assignments of one expert)."""
    out = torch.zeros_like(x)
    if most == 0:
        return out
    threads = torch.get_num_threads()
    scratch = torch.empty(lib.expert_group_scratch(ctypes.byref(group.struct), most, rows.numel(), threads))
    lib.expert_group_f32(
        ctypes.byref(group.struct), x.data_ptr(), rows.data_ptr(), weights.data_ptr(), starts.data_ptr(), most,
        out.data_ptr(), scratch.data_ptr(), threads,
    )  # fmt: skip
    return out
