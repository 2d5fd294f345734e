"""A model loaded once: weights packed for their back end, plus tokenizer. Engines, contexts and executors share it."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal.errors import ModelLoadError
from shoal.kernels.backend import Backend, CpuBackend, select_backend
from shoal.kernels.formats import canonical_quantization, convert
from shoal.kernels.packed_cache import PackedCache
from shoal.models.chat_template import ChatTemplate
from shoal.models.config import ModelConfig
from shoal.models.llama import CausalLM
from shoal.models.loader import load_checkpoint
from shoal.models.reasoning import ReasoningTokens
from shoal.models.registry import model_class

logger = logging.getLogger("shoal")
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
    backend: Backend

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def weight_bytes(self) -> int:
        return self.module.weight_bytes

    def describe_weights(self) -> str:
        """e.g. '77.1 MiB of weights (q4 x210, q8 x1) on c-avx512'."""
        kinds = Counter(self.backend.describe(w) for w in self.module.linears)
        listed = ", ".join(f"{kind} x{count}" for kind, count in kinds.most_common())
        return f"{self.weight_bytes / 2**20:.1f} MiB of weights ({listed}) on {self.backend.name}"

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: a prompt of c characters has at least
        c / max_token_chars tokens, which bounds its length before it is tokenized."""
        return max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1

    @functools.cached_property
    def reasoning_tokens(self) -> ReasoningTokens | None:
        """<think> and </think> of a reasoning model (None for other models)."""
        return ReasoningTokens.find(self.tokenizer)

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        return ChatTemplate(self.tokenizer, self.name)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The conversation as text (its BOS included when the template writes one)."""
        return self.chat_template.render(messages, add_generation_prompt, tools, template_kwargs)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The conversation as the prompt's token ids, exactly one BOS where the model has one."""
        return self.chat_template.render_ids(messages, add_generation_prompt, tools, template_kwargs)


def load_model(
    path: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    quantization: str = "auto",
    kernels: str = "auto",
    weight_cache: bool = True,
    precision: str = "float32",
) -> LoadedModel:
    """Loads weights and tokenizer once (the default SmolLM2-135M-Instruct GGUF when path is None).

    quantization: "auto" keeps each matrix as stored (GGUF quants stay quantized, bf16 stays bf16), or
    converts every matrix at load: float32, float16, bfloat16, q8_0, q4_0, q4_1.
    kernels: "auto" (shoal's C kernels for the widest instruction set that runs here, else torch), or
    "amx", "avx512", "avx2", "portable", "torch" to force one.
    precision: "float32" (quantized weights made into float32 values in registers: transformers' numbers),
    or "int8" (activations quantized per row to int8 against them, as llama.cpp: faster from a few rows up,
    logits within about 1% of float32; shoal's C kernels only).
    weight_cache: a GGUF file's packed weights are saved beside it (or under ~/.cache/shoal/packed) on the
    first load and mapped by the later ones: no repacking, and one copy shared by every process.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        quantization = canonical_quantization(quantization)
        backend = select_backend(pick_device(device), DTYPES[dtype], kernels, precision)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    ckpt = load_checkpoint(path)
    weights = {name: convert(w, quantization) if len(w.shape) == 2 else w for name, w in ckpt.weights.items()}
    cache = None
    if weight_cache and isinstance(backend, CpuBackend) and Path(ckpt.path).suffix == ".gguf":
        cache = backend.pack_cache = PackedCache.for_model(Path(ckpt.path), backend.isa, quantization)
    try:
        module = model_class(ckpt.config)(ckpt.config, weights, backend)
    finally:
        if cache is not None:
            backend.pack_cache = None
    if cache is not None:
        cache.finish()
    name = os.path.basename(os.path.normpath(ckpt.path))
    model = LoadedModel(module, ckpt.tokenizer, ckpt.config, name, backend)
    logger.info("loaded %s: %s", name, model.describe_weights())
    return model
