"""Random-weight GGUF files of real models' exact shapes, for benchmarks at the sizes users run: written in
F16 tensor by tensor (never the whole model in memory), then quantized by llama.cpp's llama-quantize, and
cached. The tokenizer is a stand-in of the model's vocabulary size (byte tokens, fillers and the chat
specials): benchmarks feed token ids, so only the shapes matter."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class Shape:
    arch: str  # GGUF architecture
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    experts: int = 0  # a mixture of experts in every layer: this many, `experts_used` per token
    experts_used: int = 0
    expert_ffn: int = 0  # one expert's intermediate size

    def kv_bytes_per_token(self, element: int = 4) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * element


SHAPES = {
    "qwen2.5-0.5b": Shape("qwen2", 896, 4864, 24, 14, 2, 64, 151936, 1e6, tied=True, qkv_bias=True),
    "qwen3-8b": Shape("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, 1e6, tied=False, qk_norm=True),
    "qwen3-30b-a3b": Shape(
        "qwen3moe",
        2048,
        6144,
        48,
        32,
        4,
        128,
        151936,
        1e6,
        tied=False,
        qk_norm=True,
        experts=128,
        experts_used=8,
        expert_ffn=768,
    ),  # fmt: skip
}
TYPES = {"q4_k_m": "Q4_K_M", "q6_k": "Q6_K", "q8_0": "Q8_0"}


def tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and numpy shapes (rows = output features), in file order."""
    h, d = shape.hidden, shape.head_dim
    out = [("token_embd.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (h,)),
            (p + "attn_q.weight", (shape.heads * d, h)),
            (p + "attn_k.weight", (shape.kv_heads * d, h)),
            (p + "attn_v.weight", (shape.kv_heads * d, h)),
            (p + "attn_output.weight", (h, shape.heads * d)),
            (p + "ffn_norm.weight", (h,)),
        ]
        out += _ffn(shape, p)
        if shape.qkv_bias:
            out += [
                (p + f"attn_{x}.bias", (n * d,))
                for x, n in (("q", shape.heads), ("k", shape.kv_heads), ("v", shape.kv_heads))
            ]
        if shape.qk_norm:
            out += [(p + "attn_q_norm.weight", (d,)), (p + "attn_k_norm.weight", (d,))]
    out.append(("output_norm.weight", (h,)))
    if not shape.tied:
        out.append(("output.weight", (shape.vocab, h)))
    return out


def _ffn(shape: Shape, p: str) -> list[tuple[str, tuple[int, ...]]]:
    """A dense gated MLP, or the router and the experts' stacked matrices [experts, rows, k]."""
    h, e, f = shape.hidden, shape.experts, shape.expert_ffn
    if not e:
        i = shape.intermediate
        return [
            (p + "ffn_gate.weight", (i, h)),
            (p + "ffn_up.weight", (i, h)),
            (p + "ffn_down.weight", (h, i)),
        ]
    return [
        (p + "ffn_gate_inp.weight", (e, h)),
        (p + "ffn_gate_exps.weight", (e, f, h)),
        (p + "ffn_up_exps.weight", (e, f, h)),
        (p + "ffn_down_exps.weight", (e, h, f)),
    ]


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_tokenizer(writer: gguf.GGUFWriter, vocab: int) -> None:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    base = _byte_tokens() + ["ĠĠ"]
    tokens = base + [f"filler{i}" for i in range(vocab - len(base) - len(specials))] + specials
    types = [gguf.TokenType.NORMAL] * (vocab - len(specials)) + [gguf.TokenType.CONTROL] * len(specials)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_eos_token_id(vocab - 1)
    writer.add_bos_token_id(vocab - 3)
    writer.add_add_bos_token(False)


def write_f16(shape: Shape, path: Path, seed: int = 0) -> None:
    writer = gguf.GGUFWriter(str(path), shape.arch)
    writer.add_block_count(shape.layers)
    writer.add_context_length(32768)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if shape.experts:
        writer.add_expert_count(shape.experts)
        writer.add_expert_used_count(shape.experts_used)
        writer.add_expert_feed_forward_length(shape.expert_ffn)
    _write_tokenizer(writer, shape.vocab)
    layout = tensors(shape)
    for name, dims in layout:
        dtype = np.float32 if _kept_f32(name, dims) else np.float16
        raw = gguf.GGMLQuantizationType.F32 if dtype == np.float32 else gguf.GGMLQuantizationType.F16
        writer.add_tensor_info(
            name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize, raw
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in layout:
        if len(dims) == 1:
            values = (
                np.ones(dims, np.float32) if "norm" in name else rng.normal(0, 0.02, dims).astype(np.float32)
            )
        else:  # rows of a matrix at a time: a std of 1/sqrt(fan-in) keeps activations in range
            dtype = np.float32 if _kept_f32(name, dims) else np.float16
            values = np.empty(dims, dtype)
            flat = values.reshape(-1, dims[-1])
            scale = dims[-1] ** -0.5
            for start in range(0, flat.shape[0], 4096):
                rows = flat[start : start + 4096]
                rows[:] = (rng.standard_normal(rows.shape, dtype=np.float32) * scale).astype(dtype)
        writer.write_tensor_data(values)
    writer.close()


def _kept_f32(name: str, dims: tuple[int, ...]) -> bool:
    """Vectors, and routers (llama-quantize leaves them in F32, as the converter writes them)."""
    return len(dims) == 1 or "ffn_gate_inp" in name


def random_gguf(name: str, qtype: str, layers: int | None, quantize: str, cache: Path) -> Path:
    """The cached file of shape `name` (with `layers` of its layers) in `qtype`, made on first use."""
    shape = shape_of(name, layers)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{name}-{shape.layers}L-{qtype}.gguf"
    if out.is_file():
        return out
    f16 = cache / f"{name}-{shape.layers}L-f16.gguf"
    if not f16.is_file():
        print(f"writing a random {name} ({shape.layers} layers) in F16 ...", flush=True)
        write_f16(shape, f16.with_suffix(".partial"))
        f16.with_suffix(".partial").rename(f16)
    print(f"llama-quantize -> {TYPES[qtype]} ...", flush=True)
    partial = out.with_suffix(".partial")
    subprocess.run([quantize, str(f16), str(partial), TYPES[qtype]], check=True, capture_output=True)
    partial.rename(out)
    return out


def shape_of(name: str, layers: int | None) -> Shape:
    shape = SHAPES[name]
    return shape if layers is None else Shape(**{**shape.__dict__, "layers": layers})
