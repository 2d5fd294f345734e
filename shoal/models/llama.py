"""One decoder for the Llama family: Llama (SmolLM2), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm), Phi-3
(LongRoPE; its fused q/k/v and gate/up are split by the loader), and the mixture-of-experts forms, Mixtral,
Qwen2-MoE (with its shared expert) and Qwen3-MoE.

Tokens of all sequences arrive flattened: [T] ids and positions, no padding between sequences. Every
operation goes through the back end the model was loaded with (kernels/backend.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shoal.kernels.backend import Backend, Heads, PreNormLayer, Rope, RoutedExperts
from shoal.kernels.formats import Weight
from shoal.models.config import ModelConfig
from shoal.models.layers import (
    Attention,
    GatedMLP,
    MixtureOfExperts,
    RotaryTable,
    rope_attention_factor,
    rope_inv_freq,
)


class DecoderLayer:
    """Pre-norm: x += attention(norm(x)), then x += mlp(norm(x)); run as one fused call where the back end
    has one."""

    def __init__(self, cfg: ModelConfig, index: int, weights: dict[str, Weight], backend: Backend):
        self.backend, self.eps = backend, cfg.rms_norm_eps
        p = f"model.layers.{index}."
        self.attn = make_attention(cfg, index, weights, backend)
        self.mlp = make_mlp(cfg, index, weights, backend)
        self.input_norm = backend.vector(weights[p + "input_layernorm.weight"])
        self.post_attention_norm = backend.vector(weights[p + "post_attention_layernorm.weight"])
        self.fused = backend.fuse_layer(self.as_pre_norm()) if self.fusable() else None

    def fusable(self) -> bool:
        """A SiLU MLP, or experts without a shared one: the forms PreNormLayer holds."""
        if isinstance(self.mlp, MixtureOfExperts):
            return self.mlp.shared is None
        return self.mlp.activation == "silu"

    def as_pre_norm(self) -> PreNormLayer:
        a, mlp = self.attn, self.mlp
        if isinstance(mlp, MixtureOfExperts):
            gate_up, down = None, None
            experts = RoutedExperts(mlp.router, mlp.group, mlp.top_k, mlp.normalize)
        else:
            gate_up, down, experts = mlp.gate_up, mlp.down, None
        return PreNormLayer(
            a.qkv, a.o, gate_up, down, self.input_norm, self.post_attention_norm, a.q_norm, a.k_norm, a.heads,
            a.window, self.eps, a.scale, experts,
        )  # fmt: skip

    @property
    def linears(self) -> list[Any]:
        return [*self.attn.linears, *self.mlp.linears]

    @property
    def vectors(self) -> list[torch.Tensor]:
        return [self.input_norm, self.post_attention_norm, *self.attn.vectors, *self.mlp.vectors]

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache, meta) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x, rope, kv_cache, meta)
        be = self.backend
        x = self.attn.forward(be.rms_norm(x, self.input_norm, self.eps), rope, kv_cache, meta, residual=x)
        return self.mlp.forward(be.rms_norm(x, self.post_attention_norm, self.eps), residual=x)


def make_attention(
    cfg: ModelConfig,
    index: int,
    weights: dict[str, Weight],
    backend: Backend,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Attention:
    """Layer `index`'s attention: q/k/v packed as one matrix (with their biases where the config has them),
    o, and the per-head q/k norms where the config has them, each norm's weight through `norm` (default: as
    stored; Gemma's 1 + w)."""
    p = f"model.layers.{index}.self_attn."
    norm = norm or backend.vector
    qkv = [p + f"{x}_proj" for x in "qkv"]
    bias = torch.cat([weights[n + ".bias"] for n in qkv]) if cfg.attention_bias else None
    q_norm, k_norm = [norm(weights[p + f"{x}_norm.weight"]) for x in "qk"] if cfg.qk_norm else [None, None]
    return Attention(
        backend,
        Heads(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
        backend.pack([weights[n + ".weight"] for n in qkv], bias),
        backend.pack([weights[p + "o_proj.weight"]], weights.get(p + "o_proj.bias")),
        cfg.attention_scale or cfg.head_dim**-0.5,
        cfg.layer_windows[index] if cfg.layer_windows else 0,
        q_norm,
        k_norm,
        cfg.rms_norm_eps,
    )


def gated_mlp(prefix: str, weights: dict[str, Weight], backend: Backend, activation: str) -> GatedMLP:
    """The MLP under `prefix` (gate_proj, up_proj, down_proj), gate and up packed as one matrix."""
    gate_up = [weights[prefix + "gate_proj.weight"], weights[prefix + "up_proj.weight"]]
    return GatedMLP(
        backend, backend.pack(gate_up), backend.pack([weights[prefix + "down_proj.weight"]]), activation
    )


def make_mlp(cfg: ModelConfig, index: int, weights: dict[str, Weight], backend: Backend):
    p = f"model.layers.{index}.mlp."
    if cfg.moe is None or not cfg.moe.sparse_layers[index]:
        return gated_mlp(p, weights, backend, cfg.hidden_activation)
    experts = [
        gated_mlp(f"{p}experts.{e}.", weights, backend, cfg.hidden_activation)
        for e in range(cfg.moe.num_experts)
    ]
    router = backend.pack([weights[p + "gate.weight"]])
    shared, shared_gate = None, None
    if cfg.moe.shared_intermediate_size:
        shared = gated_mlp(p + "shared_expert.", weights, backend, cfg.hidden_activation)
        shared_gate = backend.pack([weights[p + "shared_expert_gate.weight"]])
    return MixtureOfExperts(
        backend, router, experts, cfg.moe.top_k, cfg.moe.normalize_top_k, shared, shared_gate
    )


def mlp_shapes(cfg: ModelConfig, index: int) -> dict[str, tuple[int, ...]]:
    h = cfg.hidden_size

    def gated(prefix: str, inter: int) -> dict[str, tuple[int, ...]]:
        names = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
        return {f"{prefix}{name}.weight": shape for name, shape in names.items()}

    if cfg.moe is None or not cfg.moe.sparse_layers[index]:
        return gated("mlp.", cfg.intermediate_size)
    shapes = {"mlp.gate.weight": (cfg.moe.num_experts, h)}
    for e in range(cfg.moe.num_experts):
        shapes |= gated(f"mlp.experts.{e}.", cfg.moe.intermediate_size)
    if shared := cfg.moe.shared_intermediate_size:
        shapes |= gated("mlp.shared_expert.", shared) | {"mlp.shared_expert_gate.weight": (1, h)}
    return shapes


def attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
    }
    if cfg.attention_bias:
        shapes |= {
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
        }
    if cfg.attention_bias and cfg.architecture == "LlamaForCausalLM":
        shapes["self_attn.o_proj.bias"] = (h,)  # Llama's attention_bias covers o_proj too; Qwen2's does not
    if cfg.qk_norm:
        shapes |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    return shapes


class CausalLM:
    """The decoder over Hugging Face-named weights (fused here: q/k/v, gate/up), packed by `backend`."""

    layer_class: type = DecoderLayer
    norms = ("input_layernorm", "post_attention_layernorm")

    @classmethod
    def expected_shapes(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every parameter the model has, by HF name, with its shape."""
        h = cfg.hidden_size
        shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, h)
        for i in range(cfg.num_layers):
            layer = attention_shapes(cfg) | mlp_shapes(cfg, i) | {f"{n}.weight": (h,) for n in cls.norms}
            shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
        return shapes

    def __init__(self, cfg: ModelConfig, weights: dict[str, Weight], backend: Backend):
        self.cfg, self.backend = cfg, backend
        self.embed_tokens = backend.pack([weights["model.embed_tokens.weight"]])
        self.layers = [self.layer_class(cfg, i, weights, backend) for i in range(cfg.num_layers)]
        self.norm = backend.vector(weights["model.norm.weight"])
        tied = cfg.tie_word_embeddings
        self.lm_head = self.embed_tokens if tied else backend.pack([weights["lm_head.weight"]])
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_freq_factors)
        self.rope = RotaryTable(inv_freq.to(backend.device), rope_attention_factor(cfg.rope_scaling))

    @property
    def linears(self) -> list[Any]:
        extra = [] if self.lm_head is self.embed_tokens else [self.lm_head]
        return [self.embed_tokens, *extra, *(w for layer in self.layers for w in layer.linears)]

    @property
    def weight_bytes(self) -> int:
        vectors = [self.norm, *(v for layer in self.layers for v in layer.vectors)]
        return sum(map(self.backend.weight_bytes, self.linears)) + sum(
            v.numel() * v.element_size() for v in vectors
        )

    @property
    def bytes_per_token(self) -> int:
        """The weights a batch-1 decode step reads: all but an untied embedding table (one row of it is
        read), and of a mixture's experts only top_k of every num_experts (on average)."""
        size = self.backend.weight_bytes
        total = self.weight_bytes - (0 if self.lm_head is self.embed_tokens else size(self.embed_tokens))
        for layer in self.layers:
            if isinstance(moe := layer.mlp, MixtureOfExperts):  # (a shared expert is read whole)
                experts = sum(size(w) for e in moe.experts for w in e.linears)
                total -= experts - experts * moe.top_k // len(moe.experts)
        return total

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: per layer (k_cache, v_cache). Returns final hidden [T, hidden]."""
        be = self.backend
        x = be.embed(self.embed_tokens, input_ids).to(be.dtype)
        rope = self.rope.at(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer.forward(x, rope, kv_cache, meta)
        return be.rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    __call__ = forward

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.backend.linear(hidden, self.lm_head)
        if (cap := self.cfg.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
