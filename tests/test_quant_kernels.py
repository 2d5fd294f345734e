"""The GEMM on every kept weight format, on every kernel build this machine runs: against gguf's dequantize
and a float64 matmul, and each row's bits the same for any row count, position and thread count."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from shoal.kernels.build import ISA_FLAGS, compiler, isa_runs, load_library
from shoal.kernels.cpu import bind, gather_columns, gemm, pack_parts, pack_weight
from shoal.kernels.formats import QuantizedTensor, integer_form, kept_form, layout_runs

BUILDS = [isa for isa in ISA_FLAGS if isa_runs(isa)] if compiler() else []  # without a compiler: torch only
K_QUANTS = {
    T.Q2_K: (84, [(80, 82), (82, 84)]),
    T.Q3_K: (110, [(108, 110)]),
    T.Q4_K: (144, [(0, 2), (2, 4)]),
    T.Q5_K: (176, [(0, 2), (2, 4)]),
    T.Q6_K: (210, [(208, 210)]),
}


@pytest.fixture(scope="module", params=BUILDS)
def lib(request):
    library = load_library(request.param)
    assert library is not None, f"the {request.param} build runs here but failed to compile (see the log)"
    return bind(library)


def random_weight(qtype: T, n: int, k: int, seed: int) -> QuantizedTensor:
    """A [n, k] GGUF matrix: gguf's own quantizer where it has one, else random valid blocks."""
    rng = np.random.default_rng(seed)
    if qtype in K_QUANTS:
        size, scale_fields = K_QUANTS[qtype]
        blocks = rng.integers(0, 256, size=(n * k // 256, size), dtype=np.uint8)
        for lo, hi in scale_fields:  # finite, moderate scales
            blocks[:, lo:hi] = (
                (rng.uniform(0.001, 0.05, size=(len(blocks), 1))).astype(np.float16).view(np.uint8)
            )
        return QuantizedTensor(blocks.reshape(n, -1), qtype, (n, k))
    values = rng.standard_normal((n, k)).astype(np.float32)
    return QuantizedTensor(gguf.quants.quantize(values, qtype), qtype, (n, k))


def assert_float32_close(got: torch.Tensor, x: torch.Tensor, w: np.ndarray, bias: torch.Tensor | None = None):
    """Within float32 rounding of a k-long chain: 1e-5 of the sum of |x * w| (a sum's error scales with it)."""
    weight = torch.from_numpy(w).double()
    reference = x.double() @ weight.T + (0 if bias is None else bias.double())
    scale = x.double().abs() @ weight.abs().T + (0 if bias is None else bias.double().abs())
    assert ((got.double() - reference).abs() <= 1e-5 * scale + 1e-30).all()
    assert (got.double() - reference).abs().max() > 0 or x.shape[1] < 64  # a real float32 chain, not float64


def assert_each_row_keeps_its_bits(lib, x: torch.Tensor, packed, full: torch.Tensor) -> None:
    """x's 40 rows give `full` in every row count (every tile shape and remainder, at the start and at the
    end of the batch), with another thread count, and added to a residual."""
    for m in range(1, 40):
        assert torch.equal(gemm(lib, x[:m], packed), full[:m]), m
        assert torch.equal(gemm(lib, x[40 - m :], packed), full[40 - m :]), m
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert torch.equal(gemm(lib, x, packed), full)
    finally:
        torch.set_num_threads(threads)
    residual = torch.randn(7, full.shape[1], generator=torch.Generator().manual_seed(7))
    assert torch.equal(gemm(lib, x[:7], packed, out=residual.clone()), residual + full[:7])


TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_integer_form_dequantizes_to_exactly_what_gguf_gives(qtype):
    w = random_weight(qtype, 40, 512, seed=1)
    kept = kept_form(w)
    ours = kept.float().numpy() if isinstance(kept, torch.Tensor) else kept.dequantize()
    assert np.array_equal(ours, w.dequantize())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("n", "k"), [(40, 256), (70, 512)])
def test_gemm_matches_gguf_dequantize_and_each_row_keeps_its_bits(lib, qtype, n, k):
    w = random_weight(qtype, n, k, seed=n + k)
    g = torch.Generator().manual_seed(n)
    x, bias = torch.randn(40, k, generator=g), torch.randn(n, generator=g)
    packed = pack_weight(kept_form(w), bias)
    full = gemm(lib, x, packed)
    assert_float32_close(full, x, w.dequantize(), bias)
    assert_each_row_keeps_its_bits(lib, x, packed, full)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_every_build_gives_the_same_bits(qtype):
    """One FMA chain per element on the same dequantized values: the instruction set does not matter."""
    libs = [bind(load_library(isa)) for isa in BUILDS]
    w = random_weight(qtype, 48, 512, seed=3)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(3))
    outs = [gemm(lib, x, pack_weight(kept_form(w))) for lib in libs]
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), BUILDS


# bits per value of the file's blocks
FILE_BITS = {
    T.Q8_0: 8.5,
    T.Q4_0: 4.5,
    T.Q4_1: 5,
    T.Q5_0: 5.5,
    T.Q5_1: 6,
    T.Q4_K: 4.5,
    T.Q5_K: 5.5,
    T.Q6_K: 6.5625,
    T.Q3_K: 3.4375,
    T.Q2_K: 2.625,
}


@pytest.mark.parametrize("qtype", list(FILE_BITS), ids=lambda t: t.name)
def test_each_format_is_held_at_its_files_size(qtype):
    """Packed with its scales, a matrix takes at most 1.05x the bytes of its blocks in the file (K-quants'
    scales kept as their 8-bit factors, Q2_K's as its 4-bit ones, and float16 supers, as the file has them)."""
    n, k = 256, 1024
    w = random_weight(qtype, n, k, seed=7)
    assert w.data.nbytes == n * k * FILE_BITS[qtype] / 8
    packed = pack_weight(kept_form(w))
    assert packed.nbytes <= 1.05 * w.data.nbytes, (packed.format_name, packed.nbytes / w.data.nbytes)


def test_parts_of_different_types_run_as_one_matrix_each_in_its_own_format(lib):
    """q/k/v of a Q4_K_M file: Q4_K, Q4_K, Q6_K (and a Q8_0 part): one GEMM over runs of one layout each,
    at the parts' own sizes, every row's bits independent of the row count, the same on every build."""
    types = [(T.Q4_K, 256), (T.Q4_K, 128), (T.Q6_K, 128), (T.Q8_0, 64)]
    parts = [random_weight(t, n, 256, seed=i) for i, (t, n) in enumerate(types)]
    bias = torch.randn(576, generator=torch.Generator().manual_seed(1))
    packed = pack_parts(layout_runs([kept_form(p) for p in parts]), bias)
    assert packed.format_name == "q4+q6+q8" and packed.columns == 576
    assert packed.nbytes - bias.numel() * 4 <= 1.05 * sum(p.data.nbytes for p in parts)
    x = torch.randn(23, 256, generator=torch.Generator().manual_seed(2))
    full = gemm(lib, x, packed)
    assert_float32_close(full, x, np.concatenate([p.dequantize() for p in parts]), bias)
    for m in (1, 2, 3, 4, 7, 22):
        assert torch.equal(gemm(lib, x[:m], packed), full[:m]), m
    assert torch.equal(gemm(bind(load_library(BUILDS[-1])), x, packed), full)
    ids = torch.tensor([0, 255, 256, 383, 384, 511, 512, 575])
    expected = torch.from_numpy(np.concatenate([p.dequantize() for p in parts]))[ids]
    assert torch.equal(gather_columns(lib, packed, ids), expected)


def test_fused_parts_of_different_types_keep_every_value(lib):
    types = [T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_0, T.Q8_0]
    parts = [random_weight(t, 32, 256, seed=i) for i, t in enumerate(types)]
    runs = layout_runs([integer_form(p) for p in parts])
    assert len(runs) == 4  # the two Q4_K parts joined, the others each in their own layout
    dequantized = np.concatenate([run.dequantize() for run in runs])
    assert np.array_equal(dequantized, np.concatenate([p.dequantize() for p in parts]))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    assert_float32_close(gemm(lib, x, pack_parts(runs)), x, dequantized)


@pytest.mark.parametrize(
    "qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q3_K, T.Q4_K, T.Q6_K, T.BF16], ids=lambda t: t.name
)
def test_gathered_columns_are_the_dequantized_rows(lib, qtype):
    w = random_weight(qtype, 50, 256, seed=5)
    ids = torch.tensor([0, 49, 17, 17, 32])
    rows = gather_columns(lib, pack_weight(kept_form(w)), ids)
    assert torch.equal(rows, torch.from_numpy(w.dequantize())[ids])


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_a_matrix_packed_in_chunks_is_the_matrix_packed_at_once(lib, monkeypatch, qtype):
    """Large matrices (embeddings) are packed a chunk of rows at a time; the result is the same weight."""
    from shoal.kernels import cpu

    w = random_weight(qtype, 300, 256, seed=9)
    whole = pack_weight(kept_form(w))
    released = []
    w.release = lambda: released.append(True)
    monkeypatch.setattr(cpu, "CHUNK_ROWS", 64)
    chunked = cpu.pack_in_chunks(w)
    assert released and chunked.format_name == whole.format_name and chunked.nbytes == whole.nbytes
    for name in cpu.CHUNKED:
        a, b = getattr(whole, name), getattr(chunked, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(9))
    assert torch.equal(gemm(lib, x, chunked), gemm(lib, x, whole))
    ids = torch.tensor([0, 63, 64, 299])
    assert torch.equal(gather_columns(lib, chunked, ids), gather_columns(lib, whole, ids))
