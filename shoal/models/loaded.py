"""A model loaded once: weights on their device plus tokenizer. Engines, contexts and executors share it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from shoal.errors import ModelLoadError
from shoal.models.config import ModelConfig
from shoal.models.llama import CausalLM, rope_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu'")
    return torch.device(device)


@dataclass(eq=False)
class LoadedModel:
    module: CausalLM
    tokenizer: Any
    config: ModelConfig
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Renders with the model's template; transformers renders it in a sandboxed Jinja environment."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelLoadError(
                f"model {self.name!r} has no chat template; use generate() with plain prompts"
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def create_context(self, **options: Any):
        from shoal.sessions import Context

        return Context(self, **options)


def load_model(path: str | None = None, device: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Loads weights and tokenizer once (the default SmolLM2-135M-Instruct GGUF when path is None)."""
    from shoal.models.loader import load_checkpoint

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt = load_checkpoint(path)
    torch_device = pick_device(device)
    with torch.device("meta"):
        module = CausalLM(ckpt.config)
    module = module.to_empty(device="cpu")  # skips random init: every weight is loaded next
    module.inv_freq = rope_inv_freq(ckpt.config)
    module.load_weights(ckpt.weights)
    module = module.to(device=torch_device, dtype=DTYPES[dtype]).eval()
    module.prepare()
    name = os.path.basename(os.path.normpath(ckpt.path))
    return LoadedModel(module, ckpt.tokenizer, ckpt.config, name, torch_device, DTYPES[dtype])
