"""Engine options: validated once, never changed after the engine starts."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from shoal.errors import InvalidRequestError
from shoal.kernels.backend import KERNEL_CHOICES, PRECISIONS
from shoal.kernels.formats import canonical_quantization

KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine may spend, and how it batches.

    max_num_batched_tokens: tokens in one forward pass (llama.cpp's batch size). Larger means faster
        prefill and more concurrent decodes per step, at the cost of step latency.
    max_num_seqs: sequences decoded together. More raises throughput until compute saturates.
    max_model_len: longest prompt + output; default the model's context, capped at 8192.
    block_size: tokens per KV block. Prefix caching shares whole blocks.
    kv_cache_memory: bytes for the KV pool; default 30% of available memory (CPU) or 80% of free GPU memory.
    enable_prefix_caching: reuse KV of identical prompt prefixes across requests.
    device: "cpu", "cuda", or None for CUDA when present.
    dtype: "float32" (default; bf16 matmul is ~100x slower on CPUs without AVX512-BF16), "bfloat16", "float16".
    num_threads: torch threads on CPU; default all cores.
    quantization: weight format at load: "auto" (as stored), float32, float16, bfloat16, q8_0, q4_0, q4_1.
    kernels: compute path: "auto", or "amx", "avx512", "avx2", "portable" (shoal's C kernels), "torch".
    kv_cache_dtype: how the KV pool stores keys and values: "auto" (as the activations: float32 unless
        dtype says otherwise), float32, or float16 / bfloat16 (half the memory, twice the tokens; attention
        still computes in the activations' dtype).
    weight_cache: a GGUF file's packed weights saved beside it (or under ~/.cache/shoal/packed) at the first
        load and mapped by later ones: no repacking, one copy shared by every process on the machine.
    precision: arithmetic of products with quantized weights: "float32" (default; the weights' values made
        in registers, transformers' logits) or "int8" (activations quantized per row to int8, integer dot
        products as llama.cpp: faster for batches and prefill, logits differ by ~1%; C kernels only).
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    device: str | None = None
    dtype: str = "float32"
    num_threads: int | None = None
    quantization: str = "auto"
    kernels: str = "auto"
    kv_cache_dtype: str = "auto"
    weight_cache: bool = True
    precision: str = "float32"

    def __post_init__(self) -> None:
        checks = [
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be at least 1"),
            (self.max_num_seqs >= 1, "max_num_seqs must be at least 1"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be at least 1"),
            (
                self.block_size >= 1 and self.block_size % 4 == 0,
                "block_size must be a positive multiple of 4",
            ),
            (
                self.kv_cache_memory is None or self.kv_cache_memory > 0,
                "kv_cache_memory must be positive bytes",
            ),
            (self.dtype in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16"),
            (
                self.device in (None, "cpu", "cuda") or str(self.device).startswith("cuda:"),
                "device must be cpu or cuda",
            ),
            (
                self.kv_cache_dtype in KV_CACHE_DTYPES,
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}",
            ),
            (self.kernels in KERNEL_CHOICES, f"kernels must be one of {', '.join(KERNEL_CHOICES)}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
        ]
        try:
            canonical_quantization(self.quantization)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(f"{message} (got {self})")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequestError(f"unknown engine option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)
