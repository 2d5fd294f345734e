"""One decoder for the Llama family: Llama (SmolLM2), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Tokens of all sequences arrive flattened: [T] ids and positions, no padding between sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shoal.errors import ModelLoadError
from shoal.models.config import ModelConfig
from shoal.runner.attention import AttentionMetadata, paged_attention
from shoal.runner.cpu_kernels import (
    gemm,
    load_kernel,
    pack_weight,
    paged_attention_c,
    rms_norm_c,
    rope_store_c,
    silu_mul_c,
)

MKL_PACK_HINT = 64


def mkl_rows(n: int) -> int:
    """Rows to run MKL's packed sgemm with so a row's bits do not depend on the row count (4, 8 or >= 12, measured)."""
    return n if n >= 12 else -(-n // 4) * 4


class Linear(nn.Linear):
    """nn.Linear with CPU fast paths on prepacked weights, chosen once by CausalLM.prepare():
    shoal's C GEMM (batch-invariant for any row count), else MKL's packed sgemm (invariant for padded row
    counts, see mkl_rows), else F.linear (CUDA)."""

    packed: torch.Tensor | None = None
    kernel = None

    def pack(self, kernel) -> None:
        weight = self.weight.detach()
        if kernel is not None:
            self.kernel, self.packed = kernel, pack_weight(kernel, weight)
        else:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, MKL_PACK_HINT)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """linear(x), or residual + linear(x) (computed in place in residual on the C path)."""
        if self.kernel is not None:
            return gemm(self.kernel, x, self.packed, self.out_features, self.bias, out=residual)
        if self.packed is not None:
            y = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, MKL_PACK_HINT)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    )
    if cfg.rope_freq_factors is not None:
        if len(cfg.rope_freq_factors) != len(inv_freq):
            raise ModelLoadError(
                f"rope_freqs holds {len(cfg.rope_freq_factors)} factors, the model needs {len(inv_freq)} "
                "(head_dim / 2); is the file complete?"
            )
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float64)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_middle, middle, scaled).float()
    raise ModelLoadError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D]. Hugging Face's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.layer_windows[index] if cfg.layer_windows else 0  # sliding-window attention
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(cfg.head_dim))
            self.k_norm = nn.Parameter(torch.ones(cfg.head_dim))
        self.split = (q_size, kv_size, kv_size)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.kernel is not None:
            return self.forward_c(x, cos, sin, kv_cache, meta)
        cfg = self.cfg
        t = x.shape[0]
        h = rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        q, k, v = self.qkv_proj(h).split(self.split, dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        x = x + self.o_proj(attn.reshape(t, -1))
        h = rms_norm(x, self.post_attention_norm, cfg.rms_norm_eps)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def forward_c(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """forward() through shoal's C kernels (CPU, float32): a few fused calls instead of dozens of torch
        ops, with the residual adds done inside the GEMMs (x is updated in place)."""
        cfg, lib = self.cfg, meta.kernel
        t = x.shape[0]
        qkv = self.qkv_proj(rms_norm_c(lib, x, self.input_norm, cfg.rms_norm_eps))
        q = qkv[:, : self.split[0]].view(t, cfg.num_heads, cfg.head_dim)
        if cfg.qk_norm:
            k = qkv[:, self.split[0] : self.split[0] + self.split[1]].view(t, cfg.num_kv_heads, cfg.head_dim)
            q.copy_(rms_norm(q, self.q_norm, cfg.rms_norm_eps))
            k.copy_(rms_norm(k, self.k_norm, cfg.rms_norm_eps))
        rope_store_c(lib, qkv, cos, sin, kv_cache[0], kv_cache[1], meta.slot_mapping, cfg.num_heads)
        attn = paged_attention_c(
            lib,
            q,
            kv_cache[0],
            kv_cache[1],
            meta.row_table_offset,
            meta.tables,
            meta.row_positions,
            self.scale,
            self.window,
        )
        x = self.o_proj(attn.view(t, -1), residual=x)
        gate_up = self.gate_up_proj(rms_norm_c(lib, x, self.post_attention_norm, cfg.rms_norm_eps))
        return self.down_proj(silu_mul_c(lib, gate_up), residual=x)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: per layer (k_cache, v_cache). Returns final hidden [T, hidden]."""
        x = self.embed_tokens(input_ids)
        freqs = positions[:, None].to(self.inv_freq.dtype) * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def prepare(self) -> None:
        """After the weights are on their device: prepack CPU GEMM weights."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return
        kernel = load_kernel()
        if kernel is None and not torch.backends.mkl.is_available():
            return
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(kernel)

    def rows_for(self, n: int) -> int:
        """Rows to run n token rows with: padding only where the GEMM needs it for batch invariance."""
        uses_mkl = self.lm_head.kernel is None and self.lm_head.packed is not None
        return mkl_rows(n) if uses_mkl else max(n, 1)

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Takes Hugging Face parameter names; fuses q/k/v and gate/up."""
        missing = []

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                missing.append(name)
                return torch.zeros(0)
            return weights[name]

        def copy(dst: torch.Tensor, *names: str) -> None:
            parts = [take(n) for n in names]
            if not missing:
                dst.copy_(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])

        copy(self.embed_tokens.weight, "model.embed_tokens.weight")
        copy(self.norm, "model.norm.weight")
        if not self.cfg.tie_word_embeddings:
            copy(self.lm_head.weight, "lm_head.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = [p + f"self_attn.{x}_proj" for x in "qkv"]
            copy(layer.qkv_proj.weight, *(a + ".weight" for a in attn))
            if self.cfg.attention_bias:
                copy(layer.qkv_proj.bias, *(a + ".bias" for a in attn))
            copy(layer.o_proj.weight, p + "self_attn.o_proj.weight")
            copy(layer.gate_up_proj.weight, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            copy(layer.down_proj.weight, p + "mlp.down_proj.weight")
            copy(layer.input_norm, p + "input_layernorm.weight")
            copy(layer.post_attention_norm, p + "post_attention_layernorm.weight")
            if self.cfg.qk_norm:
                copy(layer.q_norm, p + "self_attn.q_norm.weight")
                copy(layer.k_norm, p + "self_attn.k_norm.weight")
        if missing:
            raise ModelLoadError(
                f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}; is the file complete?"
            )
