"""Reading a llama.cpp GGUF file as a Hugging Face-style config, weights under HF names, and a tokenizer.

Matrices stay as the file stores them (QuantizedTensor: raw blocks, read through the memory map); vectors
(norms, biases) are read as float32.
"""

from __future__ import annotations

import functools
import mmap
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from shoal.errors import ModelLoadError
from shoal.kernels.formats import QuantizedTensor, Weight

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # MixtralForCausalLM when it has experts
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
NAMES = "Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma 3, Phi-3"
# convert_hf_to_gguf permutes q/k rows for these, to suit llama.cpp's interleaved rotary pairs.
PERMUTED_ARCHITECTURES = ("llama",)

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"
PHI3_ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
NOT_WEIGHTS = (ROPE_FREQS, *PHI3_ROPE_FACTORS.values())  # read into the config
TEMPLATES = Path(__file__).parent / "templates"
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.gate",  # a mixture of experts' router
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",  # Qwen2-MoE's shared expert
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
PHI3_LAYER_NAMES = {**LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
LAYER_NAMES_OF = {"gemma3": GEMMA3_LAYER_NAMES, "phi3": PHI3_LAYER_NAMES}
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Turn markers llama.cpp takes as ends of generation beside the file's EOS/EOT ids, per architecture.
END_OF_TURN = {"gemma3": "<end_of_turn>", "phi3": "<|end|>"}
GEMMA3_LOCAL_ROPE_THETA = 10_000.0  # llama.cpp's, fixed for every Gemma 3
GEMMA3_SLIDING_PATTERN = 6  # every sixth layer global (llama.cpp's, fixed)
GEMMA3_27B_LAYERS = 62  # Gemma 3 27B scales queries by hidden / heads, the others by head_dim (as llama.cpp)


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as e:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or corrupt, "
            "download it again"
        ) from e


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    value = f.contents()
    # GGUF floats are float32: 1e-5 reads back as 9.99999974e-06; take the shortest decimal that round-trips.
    return float(str(np.float32(value))) if isinstance(value, float) else value


def gguf_hf_config(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """The metadata, in the keys a Hugging Face config.json would use."""
    arch = field(reader, "general.architecture")
    if arch not in HF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path} holds a {arch!r} model; shoal reads GGUF architectures {', '.join(HF_ARCHITECTURES)} "
            f"({NAMES})"
        )

    def required(name: str) -> Any:
        value = field(reader, f"{arch}.{name}")
        if value is None:
            raise ModelLoadError(
                f"{path} lacks GGUF metadata key {arch}.{name}; re-convert it with llama.cpp"
            )
        return value

    heads, hidden = required("attention.head_count"), required("embedding_length")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    eos_ids = [field(reader, "tokenizer.ggml.eos_token_id"), field(reader, "tokenizer.ggml.eot_token_id")]
    if (marker := END_OF_TURN.get(arch)) in tokens:
        eos_ids.append(tokens.index(marker))
    experts = field(reader, f"{arch}.expert_count", 0)
    hf_arch = "MixtralForCausalLM" if arch == "llama" and experts else HF_ARCHITECTURES[arch]
    config = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": len(tokens) or field(reader, f"{arch}.vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(reader, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
        "rope_theta": field(reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader, arch),
        "max_position_embeddings": field(reader, f"{arch}.context_length", 2048),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": [i for i in dict.fromkeys(eos_ids) if i is not None],
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if experts:
        used = required("expert_used_count")
        inter = field(reader, f"{arch}.expert_feed_forward_length", config["intermediate_size"])
        config |= {"num_experts": experts, "num_local_experts": experts, "num_experts_per_tok": used}
        config |= {
            "moe_intermediate_size": inter,
            "norm_topk_prob": arch != "qwen2moe",  # as llama.cpp computes each architecture
            "shared_expert_intermediate_size": _shared_expert_size(reader, arch, config),
        }
    if arch == "gemma3":
        config |= _gemma3_config(reader, config)
    if arch == "phi3":
        config |= _phi3_config(reader, config)
    return config


def _shared_expert_size(reader: GGUFReader, arch: str, config: dict[str, Any]) -> int:
    """Qwen2-MoE's shared expert: the file's size for it, else (as llama.cpp) the dense feed-forward's."""
    if arch != "qwen2moe":
        return 0
    return field(reader, f"{arch}.expert_shared_feed_forward_length") or config["intermediate_size"]


def _phi3_config(reader: GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's LongRoPE factors (two tensors). The file's sliding window is not applied: llama.cpp and
    transformers' GGUF reader both run these files with full attention (the converter's window is not trusted;
    llama.cpp PR 13676), and shoal reads them as they do."""
    rope_dims = field(reader, "phi3.rope.dimension_count", config["head_dim"])
    extra: dict[str, Any] = {"sliding_window": None, "partial_rotary_factor": rope_dims / config["head_dim"]}
    factors = {
        key: [float(v) for v in dequantize_tensor(t).reshape(-1)]
        for key, name in PHI3_ROPE_FACTORS.items()
        for t in reader.tensors
        if t.name == name
    }
    original = field(reader, "phi3.rope.scaling.original_context_length")
    if len(factors) == 2 and original is not None:
        extra["original_max_position_embeddings"] = original
        extra["rope_scaling"] = factors | {
            "rope_type": "longrope",
            "original_max_position_embeddings": original,
            "attention_factor": field(reader, "phi3.rope.scaling.attn_factor"),
        }
    return extra


def _gemma3_config(reader: GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    """What a Gemma 3 file leaves to llama.cpp's code: the layer pattern, the local RoPE base, the query
    scale."""
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    scalar = hidden // heads if layers == GEMMA3_27B_LAYERS else config["head_dim"]
    return {
        "model_type": "gemma3_text",
        "sliding_window": field(reader, "gemma3.attention.sliding_window"),
        "sliding_window_pattern": GEMMA3_SLIDING_PATTERN,
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_THETA,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": field(reader, "gemma3.final_logit_softcapping"),
    }


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = field(reader, f"{arch}.rope.scaling.type", "none")
    factor = field(reader, f"{arch}.rope.scaling.factor")
    if kind == "none" or factor is None:
        return None
    scaling = {"rope_type": kind, "factor": factor}
    if (original := field(reader, f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of a tensor (of experts' stacked tensors: the prefix its experts' numbers follow)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    names = LAYER_NAMES_OF.get(arch, LAYER_NAMES)
    if len(parts) != 4 or parts[0] != "blk":
        return None
    if parts[2] in EXPERT_NAMES:
        return f"model.layers.{parts[1]}.mlp.experts.{{}}.{EXPERT_NAMES[parts[2]]}.{parts[3]}"
    if parts[2] not in names:
        return None
    return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"


def dequantize_tensor(tensor: ReaderTensor) -> np.ndarray:
    """float32 values in the HF shape (GGUF lists dimensions innermost first)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts convert_hf_to_gguf's permute: adjacent rotary pairs back to rotate_half's (i, i + d/2)."""
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_weights(reader: GGUFReader, path: Path, num_heads: int, num_kv_heads: int) -> dict[str, Weight]:
    arch = field(reader, "general.architecture")
    unknown = [t.name for t in reader.tensors if hf_name(t.name, arch) is None and t.name not in NOT_WEIGHTS]
    if unknown:
        raise ModelLoadError(
            f"{path} has tensors shoal does not know: {', '.join(unknown[:5])}; "
            "load the model's original safetensors checkpoint instead"
        )
    weights: dict[str, Weight] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, arch)
        if name is None:
            continue  # rope factors: read into the config
        if "{}" in name:  # experts' matrices stacked [experts, n, k]: one matrix each, as stored
            weights |= {name.format(e): w for e, w in enumerate(_read_experts(tensor, reader.data))}
            continue
        try:
            weight = _read_tensor(tensor, reader.data)
        except Exception as e:
            raise ModelLoadError(
                f"cannot read tensor {tensor.name} ({tensor.tensor_type.name}) from {path}: {e}; "
                "the file may be corrupt, or use a quantization gguf cannot dequantize"
            ) from e
        heads = (
            num_heads if ".self_attn.q_proj." in name else num_kv_heads if ".self_attn.k_proj." in name else 0
        )
        if arch in PERMUTED_ARCHITECTURES and heads:
            weight = _unpermute(weight, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            weight = weight - 1.0  # the converter stored Gemma's 1 + w; the model adds the 1 back
        if (
            name.endswith("shared_expert_gate.weight")
            and isinstance(weight, torch.Tensor)
            and weight.ndim == 1
        ):
            weight = weight[None, :]  # a matrix of one row, as transformers has it
        weights[name] = weight
    return weights


def _read_experts(tensor: ReaderTensor, file_map: np.memmap) -> list[QuantizedTensor]:
    experts, n, k = (int(d) for d in reversed(tensor.shape))
    data = tensor.data.reshape(experts, n, -1)
    release = functools.partial(_drop_pages, file_map)
    return [
        QuantizedTensor(data[e], tensor.tensor_type, (n, k), functools.partial(release, data[e]))
        for e in range(experts)
    ]


def _read_tensor(tensor: ReaderTensor, file_map: np.memmap) -> Weight:
    """A matrix as stored (its rows of blocks, not yet read from the map), a vector as float32."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if len(shape) == 2:
        data = tensor.data.reshape(shape[0], -1)
        return QuantizedTensor(
            data, tensor.tensor_type, shape, functools.partial(_drop_pages, file_map, data)
        )
    return torch.from_numpy(np.array(dequantize_tensor(tensor), dtype=np.float32, order="C"))


def _drop_pages(file_map: np.memmap, view: np.ndarray) -> None:
    """The mapped file's pages under `view` out of this process's memory (MADV_DONTNEED): the loader's peak
    is then the packed weights plus one matrix, not the packed weights plus the whole file."""
    mapping = getattr(file_map, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    page = mmap.PAGESIZE
    start = view.ctypes.data - file_map.ctypes.data
    end = start + view.nbytes
    start -= start % page
    mapping.madvise(mmap.MADV_DONTNEED, start, min(-(-end // page) * page, len(mapping)) - start)


def _unpermute(weight: Weight, heads: int) -> Weight:
    if isinstance(weight, QuantizedTensor):  # rows are whole blocks: reorder them as they are
        return QuantizedTensor(
            unpermute_qk(weight.data, heads), weight.ggml_type, weight.shape, weight.release
        )
    return torch.from_numpy(np.ascontiguousarray(unpermute_qk(weight.numpy(), heads)))


def gguf_rope_factors(reader: GGUFReader) -> tuple[float, ...] | None:
    """llama.cpp's rope_freqs tensor (how its converter stores Llama 3.1 rope scaling): one divisor per
    rotary frequency, or None."""
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    return None if tensor is None else tuple(float(v) for v in dequantize_tensor(tensor).reshape(-1))


def gguf_tokenizer(reader: GGUFReader, path: Path) -> PreTrainedTokenizerBase:
    """transformers' tokenizer for the file (same ids as `AutoTokenizer.from_pretrained(dir, gguf_file=...)`)."""
    from transformers import PreTrainedTokenizerFast

    # AutoTokenizer would also rebuild the model config from the file, which takes seconds; this class does not.
    # The file is linked into an empty folder: tokenizer files lying next to it would get mixed in.
    try:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / path.name).symlink_to(path.resolve())
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(f"cannot build a tokenizer from {path}: {type(e).__name__}: {e}") from e
    template = field(reader, "tokenizer.chat_template") or _known_template(tokenizer)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    return tokenizer


def _known_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A file without a chat template, of a family whose turn markers its vocabulary shows (as llama.cpp
    falls back to its built-in formats): that family's template, shipped with shoal."""
    vocab = tokenizer.get_vocab()
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        return (TEMPLATES / "gemma.jinja").read_text()
    return None
