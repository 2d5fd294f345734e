"""The shape of a Llama-family decoder, read from a Hugging Face config dict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "Phi3ForCausalLM",
)
QKV_BIAS = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")  # q/k/v biases whatever the config says
GEMMA3_QUERY_SCALAR = 256  # transformers' default query_pre_attn_scalar


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm on each head's q and k (Qwen3)
    rope_scaling: dict[str, Any] | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # divisors of the rotary frequencies (GGUF rope_freqs)
    layer_windows: tuple[int, ...] = ()  # per layer: its sliding window, 0 for full attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    hidden_activation: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh" (Gemma)
    attention_scale: float | None = None  # scores' factor; None: head_dim ** -0.5
    local_rope_theta: float | None = None  # sliding-window layers' own RoPE base (Gemma 3)
    final_logit_softcapping: float | None = None  # logits = c * tanh(logits / c)
    moe: MoEConfig | None = None

    @property
    def family(self) -> str:
        return "gemma3" if self.architecture == "Gemma3ForCausalLM" else "llama"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; shoal runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_params = hf.get("rope_parameters") or {}
        rope_scaling = hf.get("rope_scaling") or (
            rope_params if rope_params.get("rope_type", "default") != "default" else None
        )
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in ("longrope", "su"):
            rope_scaling = _longrope(hf, rope_scaling)
        _check_whole_head_rotation(hf, rope_params)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        gemma = arch == "Gemma3ForCausalLM"
        if gemma:
            rope_theta, rope_scaling, local_theta = _gemma3_rope(hf)
        else:
            rope_theta = hf.get("rope_theta") or rope_params.get("rope_theta", 10000.0)
            local_theta = None
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=arch in QKV_BIAS or bool(hf.get("attention_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            rope_scaling=rope_scaling,
            layer_windows=layer_windows(hf, window),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_activation="gelu_tanh" if gemma else "silu",
            attention_scale=hf.get("query_pre_attn_scalar", GEMMA3_QUERY_SCALAR) ** -0.5 if gemma else None,
            local_rope_theta=local_theta,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            moe=MoEConfig.from_hf(hf, arch),
        )


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs: each token's router picks `top_k` of `num_experts` gated MLPs."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    normalize_top_k: bool  # the chosen experts' weights rescaled to sum to 1
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or a dense MLP
    shared_intermediate_size: int = 0  # a shared expert every token takes, gated by sigmoid (Qwen2-MoE)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], arch: str) -> MoEConfig | None:
        experts = hf.get("num_experts") or hf.get("num_local_experts") or 0  # Qwen's name, transformers 5's
        if arch == "MixtralForCausalLM":
            return cls(
                experts,
                hf["num_experts_per_tok"],
                hf["intermediate_size"],
                True,
                (True,) * hf["num_hidden_layers"],
            )
        if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            step, dense = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or [])
            sparse = tuple(
                i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(hf["num_hidden_layers"])
            )
            return cls(
                experts,
                hf["num_experts_per_tok"],
                hf["moe_intermediate_size"],
                bool(hf.get("norm_topk_prob", False)),
                sparse,
                hf.get("shared_expert_intermediate_size") or 0,
            )
        return None


def _longrope(hf: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's LongRoPE as one fixed table: the long factors when the model's context is longer than the one
    it was pretrained with, else the short ones, for every token. (transformers switches per forward pass
    by the longest sequence in it, so a token's result would depend on the batch; llama.cpp, like this,
    decides by the context.) cos and sin are scaled by the attention factor either way."""
    original = scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    context = hf.get("max_position_embeddings") or original
    original = original or context
    factor = scaling.get("factor") or context / original
    attention = scaling.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    )
    factors = scaling["long_factor"] if context > original else scaling["short_factor"]
    return {"rope_type": "longrope", "factors": tuple(factors), "attention_factor": attention}


def _check_whole_head_rotation(hf: dict[str, Any], rope_params: dict[str, Any]) -> None:
    partial = hf.get("partial_rotary_factor") or rope_params.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ModelLoadError(
            f"this model rotates only part of each head (partial_rotary_factor {partial}, as Phi-4-mini "
            "does); shoal's rotary embedding covers whole heads, so it cannot run this model"
        )


def _gemma3_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """Global layers' base and scaling, and the sliding layers' base: from `rope_parameters` per layer type
    (transformers 5), or the older rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    theta = full.get("rope_theta") or hf.get("rope_theta") or 1_000_000.0
    scaling = full if full.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    local = sliding.get("rope_theta") or hf.get("rope_local_base_freq") or 10_000.0
    return theta, scaling, local


def layer_windows(hf: dict[str, Any], window: int | None) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), as transformers applies them: from `layer_types` when
    the config lists them; else Gemma 3's pattern, Qwen's layers from max_window_layers on, or every layer
    (Mistral)."""
    layers = hf["num_hidden_layers"]
    if not window:
        return (0,) * layers
    if types := hf.get("layer_types"):
        return tuple(window if kind == "sliding_attention" else 0 for kind in types)
    if hf.get("model_type", "").startswith("gemma3"):  # every `pattern`-th layer global
        pattern = hf.get("sliding_window_pattern", 6)
        return tuple(window if (i + 1) % pattern else 0 for i in range(layers))
    first = hf.get("max_window_layers", 0) if hf.get("model_type", "").startswith("qwen") else 0
    return tuple(window if i >= first else 0 for i in range(layers))
