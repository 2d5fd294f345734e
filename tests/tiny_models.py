"""Tiny random checkpoints of each supported architecture, as Hugging Face directories and as GGUF files.

Helpers for tests, not tests. Everything is built in-process (no network, no downloaded weights).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
NEW_ARCHS = ("gemma3", "qwen3_moe", "mixtral", "phi3", "qwen2_moe")  # issue 19's families

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers like 12345 and 3.14 appear in text, as do dates: 2024-01-31.",
    "Café, naïve, résumé — 日本語のテキスト, emoji 🎉 and symbols ©.",
    "def main():\n    print('hello')\n    return 0\n",
    "Once upon a time, there was a small model that loved to talk about the weather.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n",
]

_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma3": Gemma3TextConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "qwen2_moe": Qwen2MoeConfig,
    "mixtral": MixtralConfig,
    "phi3": Phi3Config,
}
# Per architecture: what makes it differ from plain Llama, so each loader path gets exercised.
_VARIANTS: dict[str, dict] = {
    "llama": {"tie_word_embeddings": True},
    "mistral": {"tie_word_embeddings": False, "sliding_window": None},
    "qwen2": {"tie_word_embeddings": False, "use_sliding_window": False},
    # head_dim 128 != 64 / 4 heads, as in real Qwen3 (and the one transformers assumes for a Qwen3 GGUF)
    "qwen3": {"tie_word_embeddings": True, "head_dim": 128, "use_sliding_window": False},
    # Gemma 3 as its GGUF files assume it: every sixth layer global, the others sliding (a window of 8 here),
    # local RoPE base 10,000, global 1,000,000, head_dim 256 (the query scale's default), one KV head
    "gemma3": {
        "tie_word_embeddings": True,
        "num_hidden_layers": 6,
        "head_dim": 256,
        "num_key_value_heads": 1,
        "sliding_window": 8,
        "rope_theta": 1_000_000.0,
    },
    # eight experts, two per token, each a gated MLP of 32
    "qwen3_moe": {
        "tie_word_embeddings": False,
        "head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "use_sliding_window": False,
    },
    "mixtral": {"tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2},
    # Qwen1.5-MoE's form: q/k/v biases, eight experts, two per token, not renormalised, and a shared expert
    "qwen2_moe": {
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False,
        "use_sliding_window": False,
    },
    # Phi-3-mini-4k's form: fused qkv and gate/up, a sliding window on every layer (8 here), no rope scaling
    "phi3": {"tie_word_embeddings": False, "sliding_window": 8},
}


def longrope(head_dim: int, original: int) -> dict:
    """Phi-3-128k's rope scaling, as its config.json has it: a long and a short divisor per frequency."""
    n = head_dim // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "long_factor": [round(1.0 + 7.0 * i / (n - 1), 4) for i in range(n)],
        "short_factor": [round(1.0 + 0.5 * i / (n - 1), 4) for i in range(n)],
        "original_max_position_embeddings": original,
    }


def _pre_tokenizer(qwen: bool) -> pre_tokenizers.PreTokenizer:
    if not qwen:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def make_tiny_tokenizer(qwen: bool = False, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, with ChatML special tokens.

    GPT-2 pre-tokenization, or Qwen2's (digits split one by one) for `qwen`: transformers' AutoTokenizer
    imposes Qwen2's on any qwen2/qwen3 model directory, whatever its tokenizer.json says.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(qwen)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclass(frozen=True)
class Family:
    """A model family's tokenizer as it ships: its special tokens (those marked special=False in the real
    tokenizer_config too), which BOS and EOS it has and whether encoding adds the BOS, its chat template."""

    arch: str
    template: str
    special: tuple[str, ...]
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen2.5's <tool_call>)
    bos: str | None = None
    eos: str = "<|im_end|>"
    adds_bos: bool = False


FAMILIES = {
    "qwen2.5": Family(
        "qwen2",
        "qwen2.5.jinja",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        ("<tool_call>", "</tool_call>"),
    ),
    "qwen3-thinking": Family(
        "qwen3",
        "qwen3-thinking.jinja",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        ("<tool_call>", "</tool_call>", "<think>", "</think>"),
    ),
    "llama3.1": Family(
        "llama",
        "llama3.1.jinja",
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        adds_bos=True,
    ),  # fmt: skip
    "gemma3": Family(
        "gemma3",
        "gemma3.jinja",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<end_of_turn>",
        adds_bos=True,
    ),
    "phi3": Family(
        "phi3",
        "phi3.jinja",
        ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"),
        bos="<s>",
        eos="<|end|>",
    ),
    "mistral-v0.3": Family(
        "mistral",
        "mistral-v0.3.jinja",
        (
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        bos="<s>",
        eos="</s>",
        adds_bos=True,
    ),  # fmt: skip
}


def make_family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE with the special tokens, BOS/EOS behaviour and real chat template of a family."""
    family = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(qwen=family.arch.startswith("qwen"))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(family.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    if family.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    if family.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", special_tokens=[(family.bos, tok.token_to_id(family.bos))]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.eos,
        additional_special_tokens=[t for t in family.special if t not in (family.bos, family.eos)],
    )
    wrapped.chat_template = (TEMPLATES / family.template).read_text()
    return wrapped


def make_tiny_hf_model(
    arch: str,
    path: str | Path,
    seed: int = 0,
    max_shard_size: str | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerFast | None = None,
    context: int = 256,
    **overrides,
) -> str:
    """Saves a tiny random `arch` model (safetensors, in `dtype`) with its tokenizer and chat template into
    `path` (the tiny ChatML tokenizer unless one is given). K-quant GGUFs need hidden and intermediate sizes
    that are multiples of 256 (and, for Qwen3-MoE, moe_intermediate_size in `overrides`)."""
    if tokenizer is None and arch in ("gemma3", "phi3"):
        tokenizer = make_family_tokenizer(arch)
    tokenizer = tokenizer or make_tiny_tokenizer(qwen=arch.startswith("qwen"))
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _CONFIGS[arch](**(shape | _VARIANTS[arch] | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize_vectors(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return str(path)


def _randomize_vectors(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0; make them random so a swapped tensor shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                param.copy_(base + 0.2 * torch.randn_like(param))


def hf_safetensors(hf_dir: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the names it was saved with (Mixtral's experts as w1/w2/w3), without
    the tied copy of the embeddings."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        weights |= load_file(path)
    if json.loads((Path(hf_dir) / "config.json").read_text()).get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    return weights


def hf_state_dict(hf_dir: str) -> dict[str, torch.Tensor]:
    """What transformers holds for the model in `hf_dir`, without the tied copy of the embeddings."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight")
    return weights


# ---- GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes it ----

_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",  # Qwen2-MoE's shared expert
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3's fused ones
    "mlp.gate_up_proj": "ffn_up",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


_GEMMA3_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    if module in ("mlp.gate", "block_sparse_moe.gate"):
        return f"blk.{layer}.ffn_gate_inp.{kind}"
    if module == "mlp.shared_expert_gate":
        return f"blk.{layer}.ffn_gate_inp_shexp.{kind}"
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _GGUF_LAYER_NAMES
    return f"blk.{layer}.{names[module]}.{kind}"


def _stack_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's experts' matrices as the GGUF converter stacks them: [experts, n, k] under
    model.layers.i.experts.<gate_proj|up_proj|down_proj> (Mixtral's w1/w3/w2 read as those)."""
    pattern = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
    plain = _MIXTRAL
    stacks: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out = {}
    for name, tensor in weights.items():
        if (m := pattern.fullmatch(name)) is None:
            out[name] = tensor
            continue
        stacks.setdefault((m[1], plain.get(m[3], m[3])), {})[int(m[2])] = tensor
    for (layer, kind), experts in stacks.items():
        out[f"experts.{layer}.{kind}"] = torch.stack([experts[e] for e in sorted(experts)])
    return out


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: rotate_half pairs (i, i + d/2) become adjacent pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# Types gguf cannot quantize to: matrices get random valid blocks (finite float16 scale fields) instead.
RANDOM_BLOCK_SCALES = {
    "IQ4_NL": (0, 2),
    "Q2_K": (80, 84),
    "Q3_K": (108, 110),
    "Q4_K": (0, 4),
    "Q5_K": (0, 4),
    "Q6_K": (208, 210),
}


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """[rows, bytes per row] of random `qtype` blocks whose weights stay small (|w| below about 0.5)."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    lo, hi = RANDOM_BLOCK_SCALES[qtype]
    scales = rng.uniform(0.0001, 0.0006, size=(len(blocks), (hi - lo) // 2)).astype(np.float16)
    blocks[:, lo:hi] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(
    hf_dir: str, out_path: str | Path, qtype: str = "F32", mix: dict[str, str] | None = None
) -> str:
    """Writes the model in `hf_dir` as a GGUF; matrices in `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
    Q5_1 from the model's weights; Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL as random valid blocks), vectors F32.
    mix: another type for the matrices whose name holds a key ({"v_proj": "Q6_K"}, as Q4_K_M files mix)."""
    import gguf

    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = _GGUF_ARCH[hf["model_type"]]
    writer = gguf.GGUFWriter(str(out_path), arch)
    _write_model_metadata(writer, arch, hf)
    _write_tokenizer_metadata(writer, PreTrainedTokenizerFast.from_pretrained(hf_dir), arch)
    for name, tensor in _stack_experts(hf_safetensors(hf_dir)).items():
        data = tensor.float().numpy()
        if arch == "llama" and ".self_attn.q_proj." in name:
            data = llama_cpp_permute(data, hf["num_attention_heads"])
        elif arch == "llama" and ".self_attn.k_proj." in name:
            data = llama_cpp_permute(data, hf["num_key_value_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # convert_hf_to_gguf stores Gemma's norms as 1 + w
        kind = next((t for part, t in (mix or {}).items() if part in name), qtype)
        router = name.endswith((".gate.weight", "shared_expert_gate.weight"))  # llama-quantize: F32
        qt = (
            gguf.GGMLQuantizationType[kind]
            if data.ndim >= 2 and not router
            else gguf.GGMLQuantizationType.F32
        )
        if kind in RANDOM_BLOCK_SCALES and data.ndim >= 2 and not router:
            rows = data.size // data.shape[-1]
            raw = random_blocks(kind, rows, data.shape[-1], seed=len(name) * 7919 + data.size)
            raw = raw.reshape(*data.shape[:-1], -1)
        else:
            raw = gguf.quants.quantize(data.astype(np.float32), qt)
        if name.startswith("experts."):
            _, layer, kind_name = name.split(".")
            gguf_name = f"blk.{layer}.{_EXPERT_NAMES[kind_name]}.weight"
        else:
            gguf_name = gguf_tensor_name(name, arch)
        writer.add_tensor(gguf_name, raw, raw_dtype=qt)
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(hf))
    if rope.get("rope_type") == "longrope":
        for kind in ("long", "short"):
            writer.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(out_path)


def llama3_rope_factors(hf: dict) -> np.ndarray:
    """Llama 3.1 rope scaling as llama.cpp's converter stores it: one divisor per rotary frequency."""
    rope = hf["rope_parameters"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_model_metadata(writer, arch: str, hf: dict) -> None:
    writer.add_name(f"tiny {hf['model_type']}")
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    rope = hf.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' (the file's only one)
    writer.add_rope_freq_base(hf.get("rope_theta") or rope["rope_theta"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(hf["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if experts := hf.get("num_experts") or hf.get("num_local_experts"):
        writer.add_expert_count(experts)
        writer.add_expert_used_count(hf["num_experts_per_tok"])
        if "moe_intermediate_size" in hf:
            writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in hf:
            writer.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])
    if arch == "gemma3":
        writer.add_sliding_window(hf["sliding_window"])
    if arch == "phi3":  # as convert_hf_to_gguf's Phi3MiniModel
        writer.add_rope_dimension_count(head_dim)
        writer.add_sliding_window(hf.get("sliding_window") or 0)
        original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(original or hf["max_position_embeddings"])
        if rope.get("rope_type") == "longrope":
            scale = hf["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
            )


def _write_tokenizer_metadata(writer, tokenizer: PreTrainedTokenizerFast, arch: str) -> None:
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()  # the trained vocabulary and the tokens added after it
    special = {t["content"] for t in state["added_tokens"] if t["special"]}
    added = {t["content"] for t in state["added_tokens"] if not t["special"]}  # Qwen2.5's <tool_call>
    tokens = sorted(vocab, key=vocab.get)
    kinds = {
        **{t: gguf.TokenType.USER_DEFINED for t in added},
        **{t: gguf.TokenType.CONTROL for t in special},
    }
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([kinds.get(t, gguf.TokenType.NORMAL) for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]])
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    writer.add_chat_template(tokenizer.chat_template)


def transformers_gguf_state_dict(gguf_path: str, hf_config: dict) -> dict[str, torch.Tensor]:
    """The weights transformers reads out of a GGUF, as a reference.

    `from_pretrained(dir, gguf_file=...)` insists on `accelerate`, which shoal does not need, so this calls the
    function it uses for llama/qwen2/qwen3 files directly. `hf_config` only names the parameters; the
    file's own metadata drives dequantization and the Q/K un-permutation. Holds only the file's tensors:
    no lm_head.weight when the embeddings are tied.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)
    return {name: t.float() for name, t in parsed["tensors"].items()}


def dequantized_hf_dir(gguf_path: str, hf_dir: str, out_dir: str | Path) -> str:
    """The GGUF's weights, dequantized by gguf, saved back as the Hugging Face checkpoint in `hf_dir` was
    (its names, its config and tokenizer): transformers then runs exactly the model the file holds. The
    inverse of write_gguf: q/k un-permuted for llama files, Gemma's norms back to w, experts unstacked.
    Phi-3 files are run with full attention by llama.cpp and transformers' GGUF reader: so is this copy."""
    import shutil

    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = _GGUF_ARCH[hf["model_type"]]
    saved = hf_safetensors(hf_dir)
    names = {}  # GGUF name -> the HF name (or, for stacked experts, its saved names in expert order)
    for name in _stack_experts(saved):
        if name.startswith("experts."):
            _, layer, kind = name.split(".")
            experts = sorted(
                n for n in saved if re.fullmatch(rf"model\.layers\.{layer}\..*experts\.\d+\.\w+\.weight", n)
            )
            mine = [
                n for n in experts if n.split(".")[-2] in (kind, {v: k for k, v in _MIXTRAL.items()}[kind])
            ]
            names[f"blk.{layer}.{_EXPERT_NAMES[kind]}.weight"] = sorted(
                mine, key=lambda n: int(n.split(".")[-3])
            )
        else:
            names[gguf_tensor_name(name, arch)] = name
    weights = {}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        if tensor.name not in names:  # rope factors: in the config already
            continue
        data = dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(int(d) for d in reversed(tensor.shape))
        )
        hf_name = names[tensor.name]
        if isinstance(hf_name, list):
            weights |= {
                n: torch.from_numpy(np.array(data[e], dtype=np.float32)) for e, n in enumerate(hf_name)
            }
            continue
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            data = _llama_cpp_unpermute(data, hf["num_attention_heads"])
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            data = _llama_cpp_unpermute(data, hf["num_key_value_heads"])
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data - 1.0
        weights[hf_name] = torch.from_numpy(np.array(data, dtype=np.float32))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(hf_dir).iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json" and path.is_file():
            shutil.copy(path, out / path.name)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    if arch == "phi3":
        (out / "config.json").write_text(json.dumps(hf | {"sliding_window": None}))
    return str(out)


_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _llama_cpp_unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
