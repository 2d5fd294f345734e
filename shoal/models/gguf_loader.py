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

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# convert_hf_to_gguf permutes q/k rows for these, to suit llama.cpp's interleaved rotary pairs.
PERMUTED_ARCHITECTURES = ("llama",)

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"
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
}


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
            "(Llama, Mistral, Qwen2, Qwen3)"
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
    return {
        "architectures": [HF_ARCHITECTURES[arch]],
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


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = field(reader, f"{arch}.rope.scaling.type", "none")
    factor = field(reader, f"{arch}.rope.scaling.factor")
    if kind == "none" or factor is None:
        return None
    scaling = {"rope_type": kind, "factor": factor}
    if (original := field(reader, f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LAYER_NAMES:
        return None
    return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"


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
    unknown = [t.name for t in reader.tensors if hf_name(t.name) is None and t.name != ROPE_FREQS]
    if unknown:
        raise ModelLoadError(
            f"{path} has tensors shoal does not know: {', '.join(unknown[:5])}; "
            "load the model's original safetensors checkpoint instead"
        )
    weights: dict[str, Weight] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue  # rope_freqs: read by gguf_rope_factors
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
        weights[name] = weight
    return weights


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
    template = field(reader, "tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    return tokenizer
