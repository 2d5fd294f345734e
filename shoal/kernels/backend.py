"""The compute back ends: one object per device and path, chosen once when a model loads.

A back end packs each matrix into the layout its kernels read (keeping the stored format where it has a
kernel for it), builds the attention metadata of a step, runs a decoder layer's operations, and says how
many rows a step must be padded to. Model code calls it without knowing which one it has.

- CpuBackend: shoal's C kernels (AVX-512, AVX2 or portable C build); float32 activations; weights kept as
  float32, float16, bfloat16 or integer quants (formats.py). Batch-invariant for any row count. With
  precision "int8", integer weights multiply activations quantized per row to int8 (gemm_int8.c).
- TorchBackend: torch ops (CUDA, or a CPU without a C compiler, where MKL's packed sgemm runs the linear
  layers with rows padded to a count whose results do not depend on it). Weights dequantized at load.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from shoal.kernels import cpu, torch_ops
from shoal.kernels.build import best_isa, candidate_isas, isa_runs, load_library, release_openmp_team
from shoal.kernels.formats import QuantizedTensor, Weight, kept_form, layout_runs
from shoal.kernels.packed_cache import PackedCache

logger = logging.getLogger("shoal")
KERNEL_CHOICES = ("auto", "avx512", "avx2", "portable", "torch")
PRECISIONS = ("float32", "int8")
MKL_PACK_HINT = 64
MKL_INVARIANT_ROWS = 16


@dataclass
class ScheduledSlice:
    """One sequence's part of a step: positions start..start+n-1, and the blocks holding its KV."""

    start: int
    n: int
    block_table: list[int]


@dataclass
class KernelAttentionMetadata:
    """The C kernels' form: per row, where its block table starts in `tables`, and its position (-1: pad)."""

    slot_mapping: torch.Tensor
    row_table_offset: torch.Tensor
    tables: torch.Tensor
    row_positions: torch.Tensor
    step: Any = None  # the C struct of the step, made at its first layer


class Backend(ABC):
    name: str
    device: torch.device
    dtype: torch.dtype  # of activations (and of the KV cache unless kv_cache_dtype says otherwise)

    @abstractmethod
    def pack(self, parts: list[Weight], bias: torch.Tensor | None = None) -> Any:
        """Matrices stacked along their output rows (fused q/k/v, gate/up), as one linear layer."""

    @abstractmethod
    def weight_bytes(self, linear: Any) -> int: ...

    @abstractmethod
    def describe(self, linear: Any) -> str:
        """The format a packed layer is kept in."""

    def vector(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(device=self.device, dtype=self.dtype).contiguous()

    def release_thread_team(self) -> None:
        """Let the calling thread's OpenMP team go (its idle workers exit), before the engine computes on a
        thread of its own. libgomp keeps one team per thread that ever ran a parallel region (loading a model
        does, in torch); with more of its threads than cores it stops letting idle workers spin, and every
        parallel region then waits for a wake-up: a batch-1 step on the engine thread ran at 45 tok/s against
        150 on the loading thread (2-core Xeon). On CPU only; the teams come back when next needed."""
        if self.device.type == "cpu":
            release_openmp_team()

    @abstractmethod
    def embed(self, table: Any, ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def linear(self, x: torch.Tensor, w: Any, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T + bias, or residual + that (in place in residual where the back end can)."""

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def prepare_layer(self, layer: Any) -> Any:
        """What decoder_layer needs of a layer beyond its attributes, made once at load (None: nothing)."""
        return None

    @abstractmethod
    def decoder_layer(self, layer: Any, x: torch.Tensor, cos, sin, kv_cache, meta) -> torch.Tensor:
        """A Llama-family decoder layer (models/llama.py's DecoderLayer holds its weights): RMSNorm, fused
        q/k/v, (q/k norms), rotary embedding with the KV write, attention, output projection + x, RMSNorm,
        fused gate/up, SiLU * up, down projection + x."""

    @abstractmethod
    def attention_metadata(
        self,
        slices: list[ScheduledSlice],
        slots: list[int],
        total_rows: int,
        scratch_block: int,
        block_size: int,
    ):
        """slots: every real row's KV slot; padding rows up to total_rows write to the scratch block."""

    def rows_for(self, n: int) -> int:
        """Rows to run n token rows with: padding only where the GEMM needs it for batch invariance."""
        return max(n, 1)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _qkv_views(qkv: torch.Tensor, num_heads: int, num_kv_heads: int):
    t = qkv.shape[0]
    d = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    q = qkv[:, : num_heads * d].view(t, num_heads, d)
    k = qkv[:, num_heads * d : (num_heads + num_kv_heads) * d].view(t, num_kv_heads, d)
    v = qkv[:, (num_heads + num_kv_heads) * d :].view(t, num_kv_heads, d)
    return q, k, v


def release_stored(parts: list[Weight]) -> None:
    """The stored matrices' file pages let go once the back end holds its own copy of them."""
    for part in parts:
        if isinstance(part, QuantizedTensor):
            part.release()


class CpuBackend(Backend):
    def __init__(self, lib, isa: str, precision: str = "float32"):
        self.lib, self.name, self.isa, self.precision = cpu.bind(lib), f"c-{isa}", isa, precision
        if precision == "int8":
            self.name += "-int8"
        self.pack_cache: PackedCache | None = None  # set while a GGUF file's model is built (loaded.py)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def pack(self, parts: list[Weight], bias: torch.Tensor | None = None) -> cpu.PackedWeight:
        packed = self._packed(parts, bias)
        if self.precision == "int8":
            packed.take_int8_activations()
        return packed

    def _packed(self, parts: list[Weight], bias: torch.Tensor | None) -> cpu.PackedWeight:
        cache = self.pack_cache
        if cache is not None and (cached := cache.take(parts, bias)) is not None:
            return cached
        if len(parts) == 1 and isinstance(parts[0], QuantizedTensor):
            packed = cpu.pack_in_chunks(parts[0], bias)
        else:
            packed = cpu.pack_parts(layout_runs([kept_form(p) for p in parts]), bias)
            release_stored(parts)
        if cache is not None:
            cache.record(parts, bias, packed)
        return packed

    def weight_bytes(self, linear: cpu.PackedWeight) -> int:
        return linear.nbytes

    def describe(self, linear: cpu.PackedWeight) -> str:
        return linear.format_name + (" x int8" if linear.int8_activations else "")

    def embed(self, table: cpu.PackedWeight, ids: torch.Tensor) -> torch.Tensor:
        return cpu.gather_columns(self.lib, table, ids)

    def linear(self, x, w: cpu.PackedWeight, residual=None):
        return cpu.gemm(self.lib, x, w, out=residual)

    def rms_norm(self, x, weight, eps):
        return cpu.rms_norm_c(self.lib, x.contiguous(), weight, eps)

    def prepare_layer(self, layer):
        weights = [layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj]
        qk = [layer.q_norm, layer.k_norm] if layer.cfg.qk_norm else [None, None]
        return cpu.plan_layer(
            weights, [layer.input_norm, layer.post_attention_norm, *qk], layer.cfg, layer.window
        )

    def decoder_layer(self, layer, x, cos, sin, kv_cache, meta: KernelAttentionMetadata):
        """The whole layer in one C call (layer.c): the same kernels as the op-by-op path, one thread wake-up."""
        if meta.step is None:  # the same for every layer of a step
            meta.step = cpu.step_struct(meta, cos, sin, kv_cache[0].shape[2], kv_cache[0].dtype)
        return cpu.decoder_layer(self.lib, layer.backend_plan, x.contiguous(), meta.step, *kv_cache)

    def attention_metadata(
        self, slices, slots, total_rows, scratch_block, block_size
    ) -> KernelAttentionMetadata:
        tables: list[int] = []
        offsets: list[int] = []
        positions: list[int] = []
        for s in slices:
            offsets.extend([len(tables)] * s.n)
            positions.extend(range(s.start, s.start + s.n))
            tables.extend(s.block_table)
        pad = total_rows - len(positions)
        return KernelAttentionMetadata(
            slot_mapping=self._tensor(slots + [scratch_block * block_size] * pad),
            row_table_offset=self._tensor(offsets + [0] * pad),
            tables=self._tensor(tables or [scratch_block]),
            row_positions=self._tensor(positions + [-1] * pad),
        )


class TorchBackend(Backend):
    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.name = device, dtype, f"torch-{device.type}"
        self.mkl = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkl.is_available()
        if self.mkl:
            self.name = "torch-mkl"

    def pack(self, parts: list[Weight], bias: torch.Tensor | None = None) -> TorchLinear:
        tensors = [p if isinstance(p, torch.Tensor) else torch.from_numpy(p.dequantize()) for p in parts]
        weight = torch.cat(tensors).to(device=self.device, dtype=self.dtype).contiguous()
        release_stored(parts)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, MKL_PACK_HINT) if self.mkl else None
        return TorchLinear(weight, None if bias is None else self.vector(bias), packed)

    def weight_bytes(self, linear: TorchLinear) -> int:
        tensors = (linear.weight, linear.packed)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def describe(self, linear: TorchLinear) -> str:
        return str(linear.weight.dtype).removeprefix("torch.")

    def embed(self, table: TorchLinear, ids):
        return F.embedding(ids, table.weight)

    def linear(self, x, w: TorchLinear, residual=None):
        if w.packed is not None:
            y = torch.ops.mkl._mkl_linear(x, w.packed, w.weight, w.bias, MKL_PACK_HINT)
        else:
            y = F.linear(x, w.weight, w.bias)
        return y if residual is None else residual + y

    def rms_norm(self, x, weight, eps):
        return torch_ops.rms_norm(x, weight, eps)

    def rope_store(
        self, qkv, cos, sin, kv_cache, meta: torch_ops.TorchAttentionMetadata, num_heads, num_kv_heads
    ):
        q, k, v = _qkv_views(qkv, num_heads, num_kv_heads)
        q.copy_(torch_ops.apply_rope(q, cos, sin))
        k.copy_(torch_ops.apply_rope(k, cos, sin))
        torch_ops.write_kv(kv_cache[0], kv_cache[1], k, v, meta.slot_mapping)
        return q

    def attention(self, q, kv_cache, meta, scale, window):
        return torch_ops.paged_attention(q, kv_cache[0], kv_cache[1], meta, scale, window)

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def decoder_layer(self, layer: Any, x: torch.Tensor, cos, sin, kv_cache, meta) -> torch.Tensor:
        """Op by op, in torch."""
        cfg, t = layer.cfg, x.shape[0]
        qkv = self.linear(self.rms_norm(x, layer.input_norm, cfg.rms_norm_eps), layer.qkv_proj)
        if cfg.qk_norm:
            q, k, _ = _qkv_views(qkv, cfg.num_heads, cfg.num_kv_heads)
            q.copy_(torch_ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps))
            k.copy_(torch_ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps))
        q = self.rope_store(qkv, cos, sin, kv_cache, meta, cfg.num_heads, cfg.num_kv_heads)
        attn = self.attention(q, kv_cache, meta, layer.scale, layer.window)
        x = self.linear(attn.reshape(t, -1), layer.o_proj, residual=x)
        gate_up = self.linear(
            self.rms_norm(x, layer.post_attention_norm, cfg.rms_norm_eps), layer.gate_up_proj
        )
        return self.linear(self.silu_mul(gate_up), layer.down_proj, residual=x)

    def attention_metadata(self, slices, slots, total_rows, scratch_block, block_size):
        decode_rows, decode_tables, decode_positions, prefills = [], [], [], []
        row = 0
        for s in slices:
            if s.n == 1:
                decode_rows.append(row)
                decode_tables.append(s.block_table)
                decode_positions.append(s.start)
            else:
                prefills.append(
                    (row, s.n, self._tensor(s.block_table), self._tensor(list(range(s.start, s.start + s.n))))
                )
            row += s.n
        width = max((len(t) for t in decode_tables), default=0)
        return torch_ops.TorchAttentionMetadata(
            slot_mapping=self._tensor(slots + [scratch_block * block_size] * (total_rows - len(slots))),
            decode_rows=self._tensor(decode_rows) if decode_rows else None,
            decode_tables=self._tensor([t + [scratch_block] * (width - len(t)) for t in decode_tables])
            if decode_rows
            else None,
            decode_positions=self._tensor(decode_positions) if decode_rows else None,
            prefills=prefills,
        )

    def rows_for(self, n: int) -> int:
        """MKL gives a row the same bits for any row count from 16 up, not below (measured: 4, 8 and >= 12
        on an AVX2 EPYC, >= 16 with MKL's AVX-512 kernels on a Xeon); CUDA runs rows as they are."""
        return max(n, MKL_INVARIANT_ROWS) if self.mkl else max(n, 1)


@dataclass(eq=False)
class TorchLinear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None  # MKL's reordered copy, on CPU float32


def select_backend(
    device: torch.device, dtype: torch.dtype, kernels: str = "auto", precision: str = "float32"
) -> Backend:
    """The one place where the compute path is chosen."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    backend = _select_backend(device, dtype, kernels, precision)
    if precision == "int8" and not isinstance(backend, CpuBackend):
        raise ValueError(
            f"precision='int8' runs on shoal's C kernels only (this load uses {backend.name}); "
            "use precision='float32', or device='cpu', dtype='float32' and kernels other than 'torch'"
        )
    return backend


def _select_backend(device: torch.device, dtype: torch.dtype, kernels: str, precision: str) -> Backend:
    if kernels == "torch" or device.type != "cpu":
        return TorchBackend(device, dtype)
    if dtype != torch.float32:
        logger.info("dtype %s on CPU: shoal's C kernels compute in float32; using torch's kernels", dtype)
        return TorchBackend(device, dtype)
    if kernels != "auto" and kernels not in candidate_isas():
        raise ValueError(f"kernels={kernels!r} cannot run on this machine; choose from {candidate_isas()}")
    isa = best_isa() if kernels == "auto" else kernels
    if kernels != "auto" and not isa_runs(isa):
        raise ValueError(f"kernels={kernels!r}: this CPU cannot run that build (its probe failed)")
    lib = load_library(isa)
    if lib is None and kernels != "auto":
        raise ValueError(f"kernels={kernels!r}: shoal's C kernels could not be built here (see the log)")
    if lib is None:
        return TorchBackend(device, dtype)
    return CpuBackend(lib, isa, precision)
