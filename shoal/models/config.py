"""The shape of a Llama-family decoder, read from a Hugging Face config dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


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
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
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
            rope_theta=hf.get("rope_theta") or rope_params.get("rope_theta", 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=rope_scaling,
            layer_windows=layer_windows(hf, window),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def layer_windows(hf: dict[str, Any], window: int | None) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), as transformers applies them: from `layer_types` when
    the config lists them; else Qwen's layers from max_window_layers on, or every layer (Mistral)."""
    layers = hf["num_hidden_layers"]
    if not window:
        return (0,) * layers
    if types := hf.get("layer_types"):
        return tuple(window if kind == "sliding_attention" else 0 for kind in types)
    first = hf.get("max_window_layers", 0) if hf.get("model_type", "").startswith("qwen") else 0
    return tuple(window if i >= first else 0 for i in range(layers))
