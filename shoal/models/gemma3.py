"""Gemma 3 (text): q/k norms, RMSNorms of weight (1 + w) before and after both attention and the MLP, GeGLU
with tanh GELU, embeddings scaled by sqrt(hidden), and sliding-window layers (their own RoPE base) between
every few global ones.

Weights arrive in Hugging Face's convention (a norm's w, not 1 + w; the GGUF loader undoes the converter's + 1)."""

from __future__ import annotations

from typing import Any

import torch

from shoal.kernels.backend import Backend, Rope
from shoal.kernels.formats import Weight
from shoal.models.config import ModelConfig
from shoal.models.layers import RotaryTable, rope_inv_freq
from shoal.models.llama import CausalLM, gated_mlp, make_attention

NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


class Gemma3DecoderLayer:
    """x += norm(attention(norm(x))); x += norm(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, index: int, weights: dict[str, Weight], backend: Backend):
        p = f"model.layers.{index}."
        self.backend, self.eps = backend, cfg.rms_norm_eps

        def norm(w: torch.Tensor) -> torch.Tensor:  # Gemma's RMSNorm weight is 1 + w
            return backend.vector(1.0 + w)

        self.attn = make_attention(cfg, index, weights, backend, norm)
        self.mlp = gated_mlp(p + "mlp.", weights, backend, cfg.hidden_activation)
        self.input_norm, self.post_attention_norm, self.pre_mlp_norm, self.post_mlp_norm = (
            norm(weights[p + name + ".weight"]) for name in NORMS
        )

    @property
    def linears(self) -> list[Any]:
        return [*self.attn.linears, *self.mlp.linears]

    @property
    def vectors(self) -> list[torch.Tensor]:
        norms = [self.input_norm, self.post_attention_norm, self.pre_mlp_norm, self.post_mlp_norm]
        return [*norms, *self.attn.vectors]

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache, meta) -> torch.Tensor:
        be, eps = self.backend, self.eps
        attn = self.attn.forward(be.rms_norm(x, self.input_norm, eps), rope, kv_cache, meta)
        x = x + be.rms_norm(attn, self.post_attention_norm, eps)
        mlp = self.mlp.forward(be.rms_norm(x, self.pre_mlp_norm, eps))
        return x + be.rms_norm(mlp, self.post_mlp_norm, eps)


class Gemma3ForCausalLM(CausalLM):
    layer_class = Gemma3DecoderLayer
    norms = NORMS

    def __init__(self, cfg: ModelConfig, weights: dict[str, Weight], backend: Backend):
        weights = {**weights, "model.norm.weight": 1.0 + weights["model.norm.weight"]}
        super().__init__(cfg, weights, backend)
        local = rope_inv_freq(cfg.head_dim, cfg.local_rope_theta or cfg.rope_theta)
        self.local_rope = RotaryTable(local.to(backend.device))
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=backend.dtype, device=backend.device)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        be = self.backend
        x = be.embed(self.embed_tokens, input_ids).to(be.dtype) * self.embed_scale
        global_rope, local_rope = self.rope.at(positions, x.dtype), self.local_rope.at(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer.forward(x, local_rope if layer.attn.window else global_rope, kv_cache, meta)
        return be.rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    __call__ = forward
