"""Which model file builds a config's architecture: the one place a family is chosen."""

from __future__ import annotations

from shoal.models.config import ModelConfig
from shoal.models.gemma3 import Gemma3ForCausalLM
from shoal.models.llama import CausalLM

MODELS: dict[str, type[CausalLM]] = {"gemma3": Gemma3ForCausalLM, "llama": CausalLM}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    return MODELS[cfg.family]
