"""The blocks model files compose their decoders from: rotary tables, attention over the paged KV cache, a
gated MLP, mixture-of-experts. Each block holds its packed weights and calls the back end's operations only,
so one block serves every back end; a model's `forward` says in what order they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.errors import ModelLoadError
from shoal.kernels.backend import Backend, Heads, Rope


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    freq_factors: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """The rotary frequencies of one head (head_dim / 2), with a config's scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if freq_factors is not None:
        inv_freq = inv_freq / _factors(freq_factors, len(inv_freq))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "longrope":  # factors chosen by config._longrope
        return (inv_freq / _factors(scaling["factors"], len(inv_freq))).float()
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_middle, middle, scaled).float()
    raise ModelLoadError(
        f"rope scaling {kind!r} is not supported (supported: default, linear, llama3, longrope)"
    )


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """What cos and sin are multiplied by (LongRoPE's attention factor; 1 for the other kinds)."""
    return float((scaling or {}).get("attention_factor", 1.0))


def _factors(factors: tuple[float, ...], n: int) -> torch.Tensor:
    if len(factors) != n:
        raise ModelLoadError(
            f"the rotary scaling holds {len(factors)} factors, the model needs {n} (head_dim / 2); "
            "is the checkpoint complete?"
        )
    return torch.tensor(factors, dtype=torch.float64)


@dataclass(eq=False)
class RotaryTable:
    inv_freq: torch.Tensor  # [head_dim / 2]
    attention_factor: float = 1.0  # cos and sin scaled by it (rope_attention_factor)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos, sin [T, 1, head_dim] of the positions, rotate-half layout."""
        freqs = positions[:, None].to(self.inv_freq.dtype) * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return Rope(cos.to(dtype), sin.to(dtype))


@dataclass(eq=False)
class Attention:
    """Fused q/k/v projection, optional per-head q/k RMSNorms, rotary embedding with the KV write, paged
    attention (a sliding window where `window` > 0), output projection."""

    backend: Backend
    heads: Heads
    qkv: Any
    o: Any
    scale: float
    window: int = 0
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    eps: float = 0.0

    def forward(self, h, rope: Rope, kv_cache, meta, residual: torch.Tensor | None = None) -> torch.Tensor:
        be = self.backend
        qkv = be.linear(h, self.qkv)
        if self.q_norm is not None:
            be.head_norm(qkv, self.q_norm, self.k_norm, self.heads, self.eps)
        be.rope_store(qkv, rope, kv_cache, meta, self.heads)
        return be.linear(
            be.attention(qkv, kv_cache, meta, self.heads, self.scale, self.window), self.o, residual
        )

    @property
    def linears(self) -> list[Any]:
        return [self.qkv, self.o]

    @property
    def vectors(self) -> list[torch.Tensor]:
        return [v for v in (self.q_norm, self.k_norm) if v is not None]


@dataclass(eq=False)
class GatedMLP:
    """down(act(gate) * up), gate and up projected together; act: "silu" or "gelu_tanh"."""

    backend: Backend
    gate_up: Any
    down: Any
    activation: str = "silu"

    def forward(self, h, residual: torch.Tensor | None = None) -> torch.Tensor:
        be = self.backend
        return be.linear(
            be.gated_activation(be.linear(h, self.gate_up), self.activation), self.down, residual
        )

    @property
    def linears(self) -> list[Any]:
        return [self.gate_up, self.down]

    @property
    def vectors(self) -> list[torch.Tensor]:
        return []


@dataclass(eq=False)
class MixtureOfExperts:
    """A router picks `top_k` of the experts (gated MLPs) per token: softmax over all experts' logits, the
    top k, rescaled to sum to 1 where `normalize`; the token's output is the experts' outputs weighted.

    A shared expert, where the architecture has one (Qwen2-MoE), takes every token: its output, scaled by
    sigmoid(shared_gate(x)), is added to the routed experts'.

    The back end runs the experts together (Backend.experts): one GEMM per active expert over just its
    tokens, whose bits for a row do not depend on the other rows, and each token's outputs summed in the
    order of its experts' indices, so a token's result depends on that token alone."""

    backend: Backend
    router: Any
    experts: list[GatedMLP]
    top_k: int
    normalize: bool
    shared: GatedMLP | None = None
    shared_gate: Any = None  # [1, hidden]
    group: Any = field(init=False)

    def __post_init__(self) -> None:
        gate_ups, downs = [e.gate_up for e in self.experts], [e.down for e in self.experts]
        self.group = self.backend.expert_group(gate_ups, downs, self.experts[0].activation)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        be = self.backend
        routing = be.route(be.linear(h, self.router), self.top_k, self.normalize)
        out = be.experts(h, self.group, routing)
        if self.shared is not None:
            out = out + torch.sigmoid(be.linear(h, self.shared_gate)) * self.shared.forward(h)
        return out if residual is None else residual + out

    @property
    def linears(self) -> list[Any]:
        shared = [] if self.shared is None else [self.shared_gate, *self.shared.linears]
        return [self.router, *(w for e in self.experts for w in e.linears), *shared]

    @property
    def vectors(self) -> list[torch.Tensor]:
        return []
