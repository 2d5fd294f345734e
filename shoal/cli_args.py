"""Command-line flags for the model and engine options, shared by every `shoal` subcommand."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from shoal.config import EngineConfig

_HELP = {
    "max_num_batched_tokens": "tokens per forward pass (llama.cpp's batch size)",
    "max_num_seqs": "sequences decoded together",
    "max_model_len": "longest prompt + output (default: the model's context, capped at 8192)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "bytes for the KV cache (accepts 512MB, 2GB; default: a share of free memory)",
    "enable_prefix_caching": "reuse the KV of shared prompt prefixes",
    "device": "cpu or cuda (default: cuda when present)",
    "dtype": "float32 (default), bfloat16 or float16",
    "num_threads": "torch CPU threads (default: all cores)",
    "quantization": "weight format at load: auto (as stored, default), float32, float16, bfloat16, q8_0, q4_0, q4_1",
    "kv_cache_dtype": "KV cache storage: auto (as the activations, float32 by default), float32, float16 or bfloat16 (half the memory)",
    "kernels": "compute path: auto (default), amx, avx512, avx2, portable (shoal's C kernels) or torch",
    "weight_cache": "save a GGUF file's packed weights beside it and map them on later loads (default: on)",
    "precision": "products with quantized weights: float32 (default, transformers' numbers) or int8 (activations in int8 as llama.cpp: faster batches and prefill)",
}


def parse_bytes(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}
    s = text.strip().upper().replace("IB", "B")
    for suffix, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * scale)
    return int(s)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        help="HF directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)",
    )
    group = parser.add_argument_group("engine options")
    for f in fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP[f.name])
        else:
            kind = parse_bytes if f.name == "kv_cache_memory" else (int if "int" in str(f.type) else str)
            group.add_argument(flag, type=kind, default=None, help=_HELP[f.name])


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the user set on the command line (unset ones keep EngineConfig's defaults)."""
    return {
        f.name: getattr(args, f.name) for f in fields(EngineConfig) if getattr(args, f.name, None) is not None
    }
