"""The compute back ends: one object per device and path, chosen once when a model loads.

A back end packs each matrix into the layout its kernels read (keeping the stored format where it has a
kernel for it), builds the attention metadata of a step, offers the operations model files compose their
layers from (linear, norms, rotary embedding with the KV write, attention, gated activations), may fuse a
whole pre-norm decoder layer it knows into one call, and says how many rows a step must be padded to.
Model code calls it without knowing which one it has.

- CpuBackend: shoal's C kernels (AVX-512, AVX2 or portable C build); float32 activations; weights kept as
  float32, float16, bfloat16 or integer quants (formats.py). Batch-invariant for any row count. With
  precision "int8", integer weights multiply activations quantized per row to int8 (gemm_int8.c). A
  Llama-family layer runs as one C call (layer.c): the same kernel bodies, the same bits, fewer wake-ups.
- TorchBackend: torch ops (CUDA, or a CPU without a C compiler, where MKL's packed sgemm runs the linear
  layers with rows padded to a count whose results do not depend on it). Weights dequantized at load.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from shoal.kernels import cpu, torch_ops
from shoal.kernels.build import best_isa, candidate_isas, isa_runs, load_library, release_openmp_team
from shoal.kernels.formats import QuantizedTensor, Weight, kept_form, layout_runs
from shoal.kernels.packed_cache import PackedCache

logger = logging.getLogger("shoal")
KERNEL_CHOICES = ("auto", "amx", "avx512", "avx2", "portable", "torch")
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


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Rope:
    """A step's rotary tables: cos, sin [T, 1, head_dim] (rotate-half layout), contiguous."""

    cos: torch.Tensor
    sin: torch.Tensor


@dataclass(eq=False)
class RoutedExperts:
    """A mixture of experts without a shared expert, as a back end may fuse it into a layer: the router's
    projection, the experts as expert_group() holds them, and the router's top_k and normalize."""

    router: Any
    group: Any
    top_k: int
    normalize: bool


@dataclass(eq=False)
class PreNormLayer:
    """A Llama-family decoder layer as a back end may fuse it: x += o(attn(rope(qkv(norm(x))))), then
    x += down(silu(gate) * up(norm(x))), or x += the routed experts' outputs for norm(x) where `experts`;
    q/k norms per head where given."""

    qkv: Any
    o: Any
    gate_up: Any  # None where experts
    down: Any
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    heads: Heads
    window: int
    eps: float
    scale: float
    experts: RoutedExperts | None = None


@dataclass(eq=False)
class Routing:
    """Where a step's token rows go in a mixture of experts: each (row, expert) assignment, grouped by expert
    in ascending order (rows ascending within one), with the router's weight of it."""

    rows: torch.Tensor  # int64 [assignments]
    weights: torch.Tensor  # [assignments], the activations' dtype
    starts: torch.Tensor  # int64 [experts + 1]: where each expert's assignments begin
    most: int  # the most assignments any one expert has


@dataclass(eq=False)
class ExpertGroup:
    """A layer's experts (gated MLPs) as a back end runs them together."""

    gate_ups: list[Any]
    downs: list[Any]
    activation: str


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

    @abstractmethod
    def head_norm(self, qkv: torch.Tensor, q_norm, k_norm, heads: Heads, eps: float) -> None:
        """RMSNorm of each q head (weight q_norm) and each k head (k_norm) of qkv [T, (H + 2 Hkv) D], in place."""

    @abstractmethod
    def rope_store(self, qkv: torch.Tensor, rope: Rope, kv_cache, meta, heads: Heads) -> None:
        """Rotates qkv's q and k heads in place and writes its k and v to the rows' KV slots."""

    @abstractmethod
    def attention(
        self, qkv: torch.Tensor, kv_cache, meta, heads: Heads, scale: float, window: int
    ) -> torch.Tensor:
        """Each row's q heads (in qkv) over its sequence's cached keys and values: [T, H * D]."""

    @abstractmethod
    def gated_activation(self, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
        """gate_up [T, 2 I] (gate, then up) -> act(gate) * up [T, I]; activation "silu" or "gelu_tanh"."""

    def expert_group(self, gate_ups: list[Any], downs: list[Any], activation: str) -> Any:
        """A layer's packed experts, as `experts` takes them."""
        return ExpertGroup(gate_ups, downs, activation)

    def route(self, logits: torch.Tensor, top_k: int, normalize: bool) -> Routing:
        """The router's choice from its logits [T, experts], as transformers makes it: softmax, the top k,
        rescaled to sum to 1 where `normalize`."""
        weights, chosen = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=logits.shape[-1])
        starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        weights = weights.to(logits.dtype).flatten()[order]
        return Routing(order // top_k, weights, starts, int(counts.max()) if flat.numel() else 0)

    def experts(self, x: torch.Tensor, group: Any, routing: Routing) -> torch.Tensor:
        """Each row's sum over its experts of weight * down(act(gate) * up): one GEMM per active expert over
        just its rows, and a row's outputs added in ascending expert order (so it depends on that row only)."""
        out = torch.zeros_like(x)
        starts = routing.starts.tolist()
        for e, (gate_up, down) in enumerate(zip(group.gate_ups, group.downs, strict=True)):
            first, count = starts[e], starts[e + 1] - starts[e]
            if count == 0:
                continue
            rows = routing.rows[first : first + count]
            h = _padded(x[rows], self.rows_for(count))
            y = self.linear(self.gated_activation(self.linear(h, gate_up), group.activation), down)[:count]
            out.index_add_(0, rows, y * routing.weights[first : first + count, None])
        return out

    def fuse_layer(self, layer: PreNormLayer) -> Callable[..., torch.Tensor] | None:
        """A call running the whole layer, (x, rope, kv_cache, meta) -> x, where this back end has one
        (the same bits as composing the operations); None: the model composes them."""
        return None

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


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows` (the back end's GEMMs need that many for batch invariance)."""
    return x if rows <= x.shape[0] else torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def _qkv_views(qkv: torch.Tensor, heads: Heads):
    t, h, hkv, d = qkv.shape[0], heads.num_heads, heads.num_kv_heads, heads.head_dim
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
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
        self.workspace = cpu.Workspace()  # the fused layers' scratch

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

    def head_norm(self, qkv, q_norm, k_norm, heads: Heads, eps: float) -> None:
        cpu.head_norm_c(self.lib, qkv, q_norm, k_norm, heads.num_heads, heads.num_kv_heads, eps)

    def rope_store(self, qkv, rope: Rope, kv_cache, meta: KernelAttentionMetadata, heads: Heads) -> None:
        cpu.rope_store_c(self.lib, qkv, rope.cos, rope.sin, *kv_cache, meta.slot_mapping, heads.num_heads)

    def attention(self, qkv, kv_cache, meta: KernelAttentionMetadata, heads: Heads, scale, window):
        return cpu.attention_c(self.lib, qkv, *kv_cache, meta, heads.num_heads, scale, window)

    def gated_activation(self, gate_up, activation: str):
        return cpu.gated_activation_c(self.lib, gate_up, activation)

    def expert_group(self, gate_ups, downs, activation: str) -> cpu.ExpertGroup:
        return cpu.ExpertGroup(gate_ups, downs, activation)

    def route(self, logits, top_k: int, normalize: bool) -> Routing:
        """experts.c's router: one call instead of a dozen torch operations a layer."""
        return Routing(*cpu.route_tokens(self.lib, logits, top_k, normalize))

    def experts(self, x, group: cpu.ExpertGroup, routing: Routing):
        """experts.c's one call: the same GEMM and activation bodies, one wake-up a layer."""
        weights = routing.weights.float().contiguous()
        return cpu.expert_group(
            self.lib, group, x.contiguous(), routing.rows, weights, routing.starts, routing.most
        )

    def fuse_layer(self, layer: PreNormLayer):
        """layer.c's one call: one thread wake-up a layer instead of a dozen Python calls and wake-ups."""
        plan = cpu.plan_layer(layer)

        def run(x: torch.Tensor, rope: Rope, kv_cache, meta: KernelAttentionMetadata) -> torch.Tensor:
            if meta.step is None:  # the same for every layer of a step
                meta.step = cpu.step_struct(meta, rope.cos, rope.sin, kv_cache[0].shape[2], kv_cache[0].dtype)
            return cpu.decoder_layer(self.lib, plan, x.contiguous(), meta.step, *kv_cache, self.workspace)

        return run

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

    def head_norm(self, qkv, q_norm, k_norm, heads: Heads, eps: float) -> None:
        q, k, _ = _qkv_views(qkv, heads)
        q.copy_(torch_ops.rms_norm(q, q_norm, eps))
        k.copy_(torch_ops.rms_norm(k, k_norm, eps))

    def rope_store(self, qkv, rope: Rope, kv_cache, meta: torch_ops.TorchAttentionMetadata, heads: Heads):
        q, k, v = _qkv_views(qkv, heads)
        q.copy_(torch_ops.apply_rope(q, rope.cos, rope.sin))
        k.copy_(torch_ops.apply_rope(k, rope.cos, rope.sin))
        torch_ops.write_kv(kv_cache[0], kv_cache[1], k, v, meta.slot_mapping)

    def attention(self, qkv, kv_cache, meta, heads: Heads, scale, window):
        q, _, _ = _qkv_views(qkv, heads)
        out = torch_ops.paged_attention(q, kv_cache[0], kv_cache[1], meta, scale, window)
        return out.reshape(qkv.shape[0], -1)

    def gated_activation(self, gate_up, activation: str):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
        return act * up

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
