"""One decoder for the Llama family: Llama (SmolLM2), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Tokens of all sequences arrive flattened: [T] ids and positions, no padding between sequences. Every
operation goes through the back end the model was loaded with (kernels/backend.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shoal.errors import ModelLoadError
from shoal.kernels.backend import Backend
from shoal.kernels.formats import Weight
from shoal.models.config import ModelConfig


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


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, index: int, weights: dict[str, Weight], backend: Backend):
        self.cfg, self.backend = cfg, backend
        self.window = cfg.layer_windows[index] if cfg.layer_windows else 0  # sliding-window attention
        p = f"model.layers.{index}."
        attn = [p + f"self_attn.{x}_proj" for x in "qkv"]
        bias = torch.cat([weights[a + ".bias"] for a in attn]) if cfg.attention_bias else None
        self.qkv_proj = backend.pack([weights[a + ".weight"] for a in attn], bias)
        self.o_proj = backend.pack(
            [weights[p + "self_attn.o_proj.weight"]], weights.get(p + "self_attn.o_proj.bias")
        )
        self.gate_up_proj = backend.pack(
            [weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]
        )
        self.down_proj = backend.pack([weights[p + "mlp.down_proj.weight"]])
        self.input_norm = backend.vector(weights[p + "input_layernorm.weight"])
        self.post_attention_norm = backend.vector(weights[p + "post_attention_layernorm.weight"])
        if cfg.qk_norm:
            self.q_norm = backend.vector(weights[p + "self_attn.q_norm.weight"])
            self.k_norm = backend.vector(weights[p + "self_attn.k_norm.weight"])
        self.scale = cfg.head_dim**-0.5
        self.backend_plan = backend.prepare_layer(self)

    @property
    def linears(self) -> list[Any]:
        return [self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj]

    def forward(self, x, cos, sin, kv_cache, meta) -> torch.Tensor:
        return self.backend.decoder_layer(self, x, cos, sin, kv_cache, meta)


class CausalLM:
    """The decoder over Hugging Face-named weights (fused here: q/k/v, gate/up), packed by `backend`."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Weight], backend: Backend):
        self.cfg, self.backend = cfg, backend
        self.embed_tokens = backend.pack([weights["model.embed_tokens.weight"]])
        self.layers = [DecoderLayer(cfg, i, weights, backend) for i in range(cfg.num_layers)]
        self.norm = backend.vector(weights["model.norm.weight"])
        tied = cfg.tie_word_embeddings
        self.lm_head = self.embed_tokens if tied else backend.pack([weights["lm_head.weight"]])
        self.inv_freq = rope_inv_freq(cfg).to(backend.device)

    @property
    def linears(self) -> list[Any]:
        extra = [] if self.lm_head is self.embed_tokens else [self.lm_head]
        return [self.embed_tokens, *extra, *(w for layer in self.layers for w in layer.linears)]

    @property
    def weight_bytes(self) -> int:
        vectors = [
            self.norm,
            *(v for layer in self.layers for v in vars(layer).values() if isinstance(v, torch.Tensor)),
        ]
        return sum(map(self.backend.weight_bytes, self.linears)) + sum(
            v.numel() * v.element_size() for v in vectors
        )

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: per layer (k_cache, v_cache). Returns final hidden [T, hidden]."""
        be = self.backend
        x = be.embed(self.embed_tokens, input_ids).to(be.dtype)
        freqs = positions[:, None].to(self.inv_freq.dtype) * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer.forward(x, cos, sin, kv_cache, meta)
        return be.rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    __call__ = forward

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(hidden, self.lm_head)
