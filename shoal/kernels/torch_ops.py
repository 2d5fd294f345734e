"""The torch path of a decoder layer's ops (CUDA, or a CPU without shoal's C kernels).

Paged attention here gives a query row a result that depends only on that row, its keys and its position.

Measured on CPU (MKL), matmul rounding depends on operand shapes. Two forms are exact whatever the batch:
- scores: a sequence's query rows stacked in M (at least 4 rows) against one KV block of B keys at a time,
  so every GEMM is [M, D] @ [D, B];
- probs @ V: one [g, L] @ [L, D] product per query row and KV head, exact for any padded L.
torch.softmax is unchanged by trailing -inf padding. Together: chunked prefill, single-token decode,
recompute after preemption and prefix-cache hits all give bit-identical rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_GEMM_ROWS = 4


@dataclass
class TorchAttentionMetadata:
    """Where each scheduled token's K/V goes, and which keys each query row sees (the torch path).

    slot_mapping: [T] flat slot (block * block_size + offset) per token row; padding rows use the scratch block.
    decode_rows: [R] rows that are a sequence's only new token; decode_tables [R, nb] their block tables
        (padded with the scratch block) and decode_positions [R].
    prefills: per sequence with several new tokens: (first row, row count, block table [nb], positions [n]).
    """

    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor | None = None
    decode_tables: torch.Tensor | None = None
    decode_positions: torch.Tensor | None = None
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D]. Hugging Face's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k_cache, v_cache: [num_blocks, Hkv, B, D]; k, v: [T, Hkv, D]."""
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


def _pad_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    missing = MIN_GEMM_ROWS - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim)


def _masked_softmax(scores: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~key_ok, float("-inf")), dim=-1)


def _visible(num_keys: int, positions: torch.Tensor, window: int) -> torch.Tensor:
    """[rows, num_keys]: key j is visible from position p when j <= p (and j > p - window, if window)."""
    keys = torch.arange(num_keys, device=positions.device)[None, :]
    visible = keys <= positions[:, None]
    return visible & (keys > positions[:, None] - window) if window else visible


def _prefill(q, k_cache, v_cache, table, positions, scale, window):
    """q: [n, Hkv, g, D] for one sequence; table: [nb]; positions: [n]. Returns [n, Hkv, g, D]."""
    n, hkv, g, d = q.shape
    keys = k_cache[table].to(q.dtype).permute(1, 0, 3, 2)  # Hkv, nb, D, B (a 16-bit cache widened)
    values = v_cache[table].to(q.dtype).permute(1, 0, 2, 3).reshape(1, hkv, -1, d)  # 1, Hkv, L, D
    rows = _pad_rows((q * scale).permute(1, 0, 2, 3).reshape(hkv, n * g, d), 1)  # Hkv, M, D
    scores = torch.matmul(rows[:, None], keys)  # Hkv, nb, M, B
    scores = scores.permute(0, 2, 1, 3).reshape(hkv, rows.shape[1], -1)[:, : n * g]
    scores = scores.reshape(hkv, n, g, -1).permute(1, 0, 2, 3)  # n, Hkv, g, L
    key_ok = _visible(scores.shape[-1], positions, window)
    probs = _masked_softmax(scores, key_ok[:, None, None, :])
    return torch.matmul(probs, values)


def _decode(q, k_cache, v_cache, tables, positions, scale, window):
    """q: [R, Hkv, g, D], one row per sequence; tables: [R, nb]; positions: [R]. Returns [R, Hkv, g, D]."""
    r, hkv, g, d = q.shape
    keys = k_cache[tables].to(q.dtype).permute(0, 2, 1, 4, 3)  # R, Hkv, nb, D, B
    values = v_cache[tables].to(q.dtype).permute(0, 2, 1, 3, 4).reshape(r, hkv, -1, d)  # R, Hkv, L, D
    rows = _pad_rows(q * scale, 2)  # R, Hkv, M, D
    scores = torch.matmul(rows[:, :, None], keys)  # R, Hkv, nb, M, B
    scores = scores.permute(0, 1, 3, 2, 4).reshape(r, hkv, rows.shape[2], -1)[:, :, :g]  # R, Hkv, g, L
    key_ok = _visible(scores.shape[-1], positions, window)
    probs = _masked_softmax(scores, key_ok[:, None, None, :])
    return torch.matmul(probs, values)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: TorchAttentionMetadata,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """The torch path (CUDA, or CPU without shoal's C kernels). q: [T, H, D], with the step's K/V already
    written to the cache. Returns [T, H, D]. window > 0: each row sees only its last `window` keys."""
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    q = q.reshape(t, hkv, h // hkv, d)
    out = torch.zeros_like(q)
    if meta.decode_rows is not None:
        rows = meta.decode_rows
        out[rows] = _decode(
            q[rows], k_cache, v_cache, meta.decode_tables, meta.decode_positions, scale, window
        )
    for start, n, table, positions in meta.prefills:
        out[start : start + n] = _prefill(
            q[start : start + n], k_cache, v_cache, table, positions, scale, window
        )
    return out.view(t, h, d)
