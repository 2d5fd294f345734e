"""shoal's logits against transformers', for each architecture, from safetensors and from GGUF."""

from pathlib import Path

import pytest
import torch
from conftest import make_phi3_pair
from test_quant_kernels import BUILDS
from tiny_models import dequantized_hf_dir, make_tiny_hf_model, write_gguf
from transformers import AutoConfig, AutoModelForCausalLM

import shoal
from shoal.core.block_manager import BlockManager
from shoal.core.sequence import Sequence
from shoal.runner.model_runner import ModelRunner

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
TOL = 1e-4  # fp32: observed differences are ~1e-5 on logits of magnitude ~5


def load(path: str, c_kernel: bool = True) -> shoal.LoadedModel:
    """c_kernel=False: the torch back end, as on CUDA or without a C compiler."""
    return shoal.load_model(path, kernels="auto" if c_kernel else "torch")


def shoal_logits(
    model: shoal.LoadedModel, ids: list[int], chunks: list[int], kv_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Logits of every position, computed in the given chunks (the rest one token at a time, as decode)."""
    runner = ModelRunner(model.module, 16, 8 << 20, kv_dtype)
    bm = BlockManager(runner.num_blocks, 16)
    seq = Sequence("s", ids, len(ids), shoal.SamplingParams())
    sizes = chunks + [1] * (len(ids) - sum(chunks))
    rows = []
    with torch.inference_mode():
        for n in sizes:
            bm.grow(seq, n)
            batch = runner.build([(seq, n)])
            hidden = model.module(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
            rows.append(runner.logits(hidden[: batch.num_rows]))  # padded as the runner does
            seq.num_computed_tokens += n
    return torch.cat(rows).float()


def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def prompt_ids(model: shoal.LoadedModel) -> list[int]:
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. Hello, world! 12345 Café")
    return (ids * 3)[:40]


@pytest.mark.parametrize("c_kernel", [True, False], ids=["c-kernel", "torch-attention"])
@pytest.mark.parametrize("arch", ARCHS + ["gemma3", "qwen3_moe", "mixtral", "qwen2_moe", "phi3", "phi3_128k"])
def test_safetensors_logits_match_transformers_prefill_and_paged_decode(
    tiny_dirs, gemma3_dir, moe_dirs, phi3_dirs, arch, c_kernel
):
    hf_dir = {**tiny_dirs, "gemma3": gemma3_dir, **moe_dirs, **phi3_dirs}[arch]
    model = load(hf_dir, c_kernel)
    ids = prompt_ids(model)
    ref = reference_logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), ids)
    ours = shoal_logits(model, ids, chunks=[17, 9])  # two prefill chunks, then 14 decodes
    assert ref.abs().max() > 1.0  # a model with real signal, not all-zero logits
    assert (ours - ref).abs().max().item() < TOL
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_logits_match_transformers_reading_the_same_gguf(tiny_dirs, tmp_path, arch):
    gguf_path = write_gguf(tiny_dirs[arch], tmp_path / f"{arch}.gguf", qtype="F32")
    model = shoal.load_model(gguf_path)
    ids = prompt_ids(model)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=Path(gguf_path).name).eval()
    ref = reference_logits(hf, ids)
    ours = shoal_logits(model, ids, chunks=[40 - 8])
    assert (ours - ref).abs().max().item() < TOL
    # and the GGUF holds the same model as the safetensors directory (Q/K permutation undone)
    from_st = shoal_logits(shoal.load_model(tiny_dirs[arch]), ids, chunks=[40 - 8])
    assert (ours - from_st).abs().max().item() < TOL


@pytest.mark.parametrize("c_kernel", [True, False], ids=["c-kernel", "torch-attention"])
def test_a_row_is_bit_identical_however_the_prompt_is_chunked(tiny_dirs, c_kernel):
    model = load(tiny_dirs["qwen2"], c_kernel)
    ids = prompt_ids(model)
    whole = shoal_logits(model, ids, chunks=[40])
    for chunks in ([1, 39], [16, 16, 8], [5], [33, 7]):
        assert torch.equal(shoal_logits(model, ids, chunks=chunks), whole), chunks


def test_gguf_with_rope_freqs_matches_transformers_llama3_rope_scaling(tiny_dirs, tmp_path):
    """Llama 3.1-style GGUFs carry rope scaling as a rope_freqs tensor; transformers reads the scaling from
    config.json. Positions up to 40 against an original context of 16 exercise every branch of it."""
    import json
    import shutil

    hf_dir = tmp_path / "llama3-rope"
    shutil.copytree(tiny_dirs["llama"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    (hf_dir / "config.json").write_text(json.dumps(config))
    model = shoal.load_model(write_gguf(str(hf_dir), tmp_path / "llama3-rope.gguf"))
    assert model.config.rope_scaling is None and model.config.rope_freq_factors  # from the tensor alone
    ids = prompt_ids(model)
    ref = reference_logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), ids)
    plain = reference_logits(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval(), ids)
    assert (ref - plain).abs().max() > 1e-2  # the scaling really changes the logits
    torch.testing.assert_close(shoal_logits(model, ids, chunks=[17, 9]), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("c_kernel", [True, False], ids=["c-kernel", "torch-attention"])
def test_sliding_window_attention_matches_transformers(tiny_dirs, tmp_path, c_kernel):
    """Mistral with a window of 8: past position 8 each row sees only its last 8 keys, in prefill and decode."""
    import json
    import shutil

    hf_dir = tmp_path / "mistral-window"
    shutil.copytree(tiny_dirs["mistral"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["sliding_window"] = 8
    (hf_dir / "config.json").write_text(json.dumps(config))
    model = load(str(hf_dir), c_kernel)
    assert model.config.layer_windows == (8, 8)
    ids = prompt_ids(model)
    ref = reference_logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), ids)
    full = reference_logits(AutoModelForCausalLM.from_pretrained(tiny_dirs["mistral"]).eval(), ids)
    assert (ref[8:] - full[8:]).abs().max() > 1e-2 and torch.equal(ref[:8], full[:8])
    ours = shoal_logits(model, ids, chunks=[17, 9])
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("arch", [*ARCHS, "phi3", "phi3_128k", "qwen3_moe", "mixtral"])
def test_the_fused_c_layer_gives_the_bits_of_the_composed_operations(
    tiny_dirs, phi3_dirs, moe_dirs, tmp_path, arch, precision, monkeypatch
):
    """layer.c runs a Llama-family layer in one call, its MLP a mixture of experts where the model has one;
    the model's own forward composes the same operations."""
    from shoal.kernels.backend import CpuBackend

    dirs = {**tiny_dirs, **phi3_dirs, **moe_dirs}
    gguf_path = write_gguf(dirs[arch], tmp_path / f"{arch}.gguf", qtype="Q8_0")
    fused = shoal.load_model(gguf_path, precision=precision, weight_cache=False)
    assert all(layer.fused is not None for layer in fused.module.layers)
    ids, chunks = prompt_ids(fused), [17, 9]
    if arch in moe_dirs:  # a chunk of 530 rows, 1,060 assignments: experts.c's prefill form too
        ids, chunks = (ids * 15)[:600], [530, 69]
    expected = shoal_logits(fused, ids, chunks=chunks)
    monkeypatch.setattr(CpuBackend, "fuse_layer", lambda self, layer: None)
    composed = shoal.load_model(gguf_path, precision=precision, weight_cache=False)
    assert all(layer.fused is None for layer in composed.module.layers)
    assert torch.equal(shoal_logits(composed, ids, chunks=chunks), expected)


def test_a_mixture_with_a_shared_expert_runs_composed(moe_dirs):
    """layer.c's mixture of experts has no shared expert: Qwen2-MoE's layers compose their operations."""
    model = shoal.load_model(moe_dirs["qwen2_moe"], weight_cache=False)
    assert all(layer.fused is None for layer in model.module.layers)


# ---- issue 19's families: Gemma 3, Qwen3-MoE, Mixtral, Qwen2-MoE, Phi-3 ----

NEW_ARCHS = ["gemma3", "qwen3_moe", "mixtral", "qwen2_moe", "phi3", "phi3_128k"]


@pytest.fixture(scope="module")
def family_dirs(gemma3_dir, moe_dirs, phi3_dirs) -> dict[str, str]:
    return {"gemma3": gemma3_dir, **moe_dirs, **phi3_dirs}


@pytest.fixture(scope="module")
def wide_family_dirs(tmp_path_factory) -> dict[str, str]:
    """Every matrix's k a multiple of 256, as K-quants need."""
    root = tmp_path_factory.mktemp("wide-families")
    sizes = {"hidden_size": 256, "intermediate_size": 256}
    return {
        "gemma3": make_tiny_hf_model("gemma3", root / "gemma3", **sizes),
        "qwen3_moe": make_tiny_hf_model(
            "qwen3_moe", root / "qwen3_moe", moe_intermediate_size=256, head_dim=64, **sizes
        ),
        "mixtral": make_tiny_hf_model("mixtral", root / "mixtral", **sizes),
        "qwen2_moe": make_tiny_hf_model(
            "qwen2_moe",
            root / "qwen2_moe",
            moe_intermediate_size=256,
            shared_expert_intermediate_size=256,
            **sizes,
        ),  # fmt: skip
        **make_phi3_pair(root, **sizes),
    }


@pytest.mark.parametrize("kernels", BUILDS)
@pytest.mark.parametrize(("arch", "qtype"), [(a, q) for a in NEW_ARCHS for q in ("Q8_0", "Q4_0", "Q4_K")])
def test_new_families_from_gguf_match_transformers_on_the_files_weights(
    family_dirs, wide_family_dirs, tmp_path, arch, qtype, kernels
):
    """The file quantized as llama.cpp writes it (experts stacked per layer, Gemma's norms as 1 + w, the
    routers in F32, Phi-3's q/k/v and gate/up fused, its LongRoPE factors as two tensors), kept quantized
    by shoal, against transformers on the same weights dequantized by gguf."""
    hf_dir = (wide_family_dirs if qtype == "Q4_K" else family_dirs)[arch]
    path = write_gguf(hf_dir, tmp_path / f"{arch}-{qtype}.gguf", qtype)
    model = shoal.load_model(path, kernels=kernels, weight_cache=False)
    assert model.config.architecture == AutoConfig.from_pretrained(hf_dir).architectures[0]
    kinds = {model.backend.describe(w) for w in model.module.linears}
    assert {"Q8_0": "q8", "Q4_0": "q4", "Q4_K": "q4"}[qtype] in kinds  # kept in the file's format
    reference = AutoModelForCausalLM.from_pretrained(
        dequantized_hf_dir(path, hf_dir, tmp_path / "ref")
    ).eval()
    ids = prompt_ids(model)
    ref = reference_logits(reference, ids)
    torch.testing.assert_close(shoal_logits(model, ids, chunks=[17, 9]), ref, rtol=0, atol=TOL)


def test_gemma3_gguf_is_read_as_transformers_reads_it(gemma3_dir, tmp_path):
    """transformers' own GGUF reader (norms' + 1 undone, layer pattern and RoPE bases from llama.cpp's rules)."""
    path = write_gguf(gemma3_dir, tmp_path / "gemma3.gguf", qtype="F32")
    model = shoal.load_model(path)
    assert model.config.layer_windows == (8, 8, 8, 8, 8, 0)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="gemma3.gguf").eval()
    ids = prompt_ids(model)
    torch.testing.assert_close(
        shoal_logits(model, ids, chunks=[40 - 8]), reference_logits(hf, ids), rtol=0, atol=TOL
    )


def test_phi3_gguf_is_read_as_transformers_reads_it(phi3_dirs, tmp_path):
    """Full attention, as transformers' GGUF reader and llama.cpp run Phi-3 files (the window in the file is
    ignored by both); from safetensors the window of 8 applies (the safetensors test)."""
    path = write_gguf(phi3_dirs["phi3"], tmp_path / "phi3.gguf", qtype="F32")
    model = shoal.load_model(path)
    assert model.config.layer_windows == (0, 0)
    assert shoal.load_model(phi3_dirs["phi3"]).config.layer_windows == (8, 8)
    end = model.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in model.config.eos_token_ids  # Phi-3's end of turn
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="phi3.gguf").eval()
    ids = prompt_ids(model)
    torch.testing.assert_close(
        shoal_logits(model, ids, chunks=[40 - 8]), reference_logits(hf, ids), rtol=0, atol=TOL
    )


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_phi3_chats_in_its_turn_format_and_ends_at_its_end_token(phi3_dirs, tmp_path, source):
    hf_dir = phi3_dirs["phi3"]
    path = hf_dir if source == "safetensors" else write_gguf(hf_dir, tmp_path / "phi3.gguf", qtype="Q8_0")
    llm = shoal.LLM(shoal.load_model(path), kv_cache_memory=8 << 20)
    end = llm.get_tokenizer().convert_tokens_to_ids("<|end|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    params = shoal.SamplingParams(max_tokens=12, logit_bias={end: 100})
    (out,) = llm.chat(messages, params, use_tqdm=False)
    assert out.prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHello, world!<|end|>\n<|assistant|>\n"
    done = out.outputs[0]
    assert done.token_ids[-1] == end and done.finish_reason == "stop" and "<|end|>" not in done.text


def test_longrope_takes_the_long_factors_for_a_context_past_the_original(phi3_dirs):
    """The factors are fixed by the context, not by the batch: with 256 against an original 16, the long
    ones, scaled by sqrt(1 + ln 16 / ln 16); the same model with its original context takes the short."""
    import json

    config = json.loads((Path(phi3_dirs["phi3_128k"]) / "config.json").read_text())
    long = shoal.load_model(phi3_dirs["phi3_128k"]).config.rope_scaling
    assert long["factors"] == tuple(config["rope_parameters"]["long_factor"])
    assert long["attention_factor"] == pytest.approx(2**0.5)
    from shoal.models.config import ModelConfig

    short = ModelConfig.from_hf(config | {"max_position_embeddings": 16}).rope_scaling
    assert short["factors"] == tuple(config["rope_parameters"]["short_factor"])
    assert short["attention_factor"] == 1.0


def test_a_partly_rotated_head_fails_at_load_saying_so(phi3_dirs, tmp_path):
    import json
    import shutil

    folder = tmp_path / "phi4-mini"
    shutil.copytree(phi3_dirs["phi3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = config["rope_parameters"] | {"partial_rotary_factor": 0.75}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(shoal.ModelLoadError, match="partial_rotary_factor 0.75"):
        shoal.load_model(str(folder))


def test_a_gemma3_multimodal_checkpoint_runs_its_language_model(tmp_path):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: the text model under language_model.*,
    its config nested as text_config, a vision tower beside it. shoal runs the text model."""
    from tiny_models import make_family_tokenizer
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = make_family_tokenizer("gemma3")
    text = {
        "vocab_size": len(tokenizer) + 1, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 8,
        "max_position_embeddings": 256, "initializer_range": 0.2,
    }  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=len(tokenizer)
    )
    torch.manual_seed(0)
    reference = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms away from 1, so that a norm read wrong shows
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
    reference.save_pretrained(tmp_path / "gemma3-4b-like")
    tokenizer.save_pretrained(tmp_path / "gemma3-4b-like")
    model = shoal.load_model(str(tmp_path / "gemma3-4b-like"))
    assert model.config.architecture == "Gemma3ForCausalLM"
    assert model.config.layer_windows == (8, 8, 8, 8, 8, 0)
    ids = prompt_ids(model)
    ref = reference_logits(reference, ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(shoal_logits(model, ids, chunks=[17, 9]), ref, rtol=0, atol=TOL)


def test_an_architecture_shoal_does_not_run_fails_at_load_naming_the_ones_it_does(tiny_dirs, tmp_path):
    import json
    import shutil

    folder = tmp_path / "phi"
    shutil.copytree(tiny_dirs["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(
        shoal.ModelLoadError, match="FalconForCausalLM.*Gemma3ForCausalLM.*MixtralForCausalLM"
    ):
        shoal.load_model(str(folder))


def test_a_token_reads_the_weights_of_its_top_k_experts_only(tiny_dirs, moe_dirs):
    dense = shoal.load_model(tiny_dirs["llama"])  # tied: the embedding table is the lm_head, read whole
    assert dense.module.bytes_per_token == dense.weight_bytes
    moe = shoal.load_model(moe_dirs["mixtral"])  # 8 experts, 2 per token, untied embeddings
    size = moe.backend.weight_bytes
    experts = sum(size(w) for layer in moe.module.layers for e in layer.mlp.experts for w in e.linears)
    embedding = size(moe.module.embed_tokens)
    assert moe.module.bytes_per_token == moe.weight_bytes - embedding - experts * 3 // 4
