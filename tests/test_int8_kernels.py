"""The int8-activation GEMM (precision="int8", gemm_int8.c) on every integer layout and kernel build this
machine runs: exact integer dot products (against float64 on the same int8 activations, quantized here in
numpy), each row's bits the same for any row count, position, thread count and build, and its distance from
the float32 path."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from test_quant_kernels import BUILDS, assert_each_row_keeps_its_bits, assert_float32_close, random_weight
from test_quant_kernels import K_QUANTS as K_QUANTS_LAYOUT

from shoal.kernels.build import load_library
from shoal.kernels.cpu import bind, gemm, pack_parts, pack_weight
from shoal.kernels.formats import QuantizedTensor, kept_form

INT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.fixture(scope="module", params=BUILDS)
def lib(request):
    return bind(load_library(request.param))


K_QUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def block_of(qtype: T) -> int:
    """The k per activation scale the kernels take for a weight of this type: a K-quant's superblock (as
    llama.cpp's Q8_K), else 32 (as its Q8_0)."""
    return 256 if qtype in K_QUANTS else 32


def int8_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels quantize it, per row in blocks of `block`: d = max|x| / 127, q = round(x * (127 /
    max|x|)) (float32 arithmetic, ties to even), returned as d * q in float64."""
    blocks = x.numpy().astype(np.float32).reshape(x.shape[0], -1, block)
    amax = np.abs(blocks).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((blocks * inv).astype(np.float32)), -127, 127)
    d = (amax / np.float32(127)).astype(np.float32)
    return torch.from_numpy((q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape))


def int8_packed(w, bias=None):
    packed = pack_weight(kept_form(w), bias)
    packed.take_int8_activations()
    assert packed.int8_activations
    return packed


@pytest.mark.parametrize("qtype", INT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("n", "k"), [(40, 256), (70, 512)])
def test_int8_gemm_is_exact_on_the_quantized_activations_and_each_row_keeps_its_bits(lib, qtype, n, k):
    w = random_weight(qtype, n, k, seed=n + k)
    g = torch.Generator().manual_seed(n)
    x, bias = torch.randn(40, k, generator=g) * 3, torch.randn(n, generator=g)
    x[5, : block_of(qtype)] = 0  # an all-zero block
    packed = int8_packed(w, bias)
    full = gemm(lib, x, packed)
    assert_float32_close(full, int8_activations(x, block_of(qtype)).float(), w.dequantize(), bias)
    # from 24 rows (AVX2: 8) Q6_K, Q5_K, Q3_K and Q2_K (AVX2: and Q4_K from 16) run against superblocks decoded
    # once, fewer in tiles
    assert_each_row_keeps_its_bits(lib, x, packed, full)


@pytest.mark.parametrize("qtype", sorted(K_QUANTS, key=lambda t: t.name), ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0xFF, 0x80, 0x7F])
def test_int8_k_quants_are_exact_at_the_largest_values(lib, qtype, fill):
    """Every quant and sub-scale byte `fill` (0xFF: Q6_K's largest value, 63, against x's 127 everywhere: the
    sums the AVX2 build keeps in 16 bits at their largest), against float64: a sum that wrapped or saturated
    would be off by thousands."""
    size, scale_fields = K_QUANTS_LAYOUT[qtype]
    n, k = 32, 512
    blocks = np.full((n * k // 256, size), fill, dtype=np.uint8)
    for lo, hi in scale_fields:
        blocks[:, lo:hi] = np.full((len(blocks), 1), 0.01, dtype=np.float16).view(np.uint8)
    w = QuantizedTensor(blocks.reshape(n, -1), qtype, (n, k))
    x = torch.ones(48, k)
    x[16:32] = -1  # every sign of product
    x[32:] *= torch.where(torch.arange(k) < 256, 1.0, -2.0)  # a superblock of each sign
    packed = int8_packed(w)
    full = gemm(lib, x, packed)
    weight = torch.from_numpy(w.dequantize()).double()
    reference = int8_activations(x, 256) @ weight.T
    assert ((full.double() - reference).abs() <= 1e-5 * (x.double().abs() @ weight.abs().T)).all()
    assert torch.equal(gemm(lib, x[:5], packed), full[:5])  # the tiles of a few rows


@pytest.mark.parametrize("qtype", INT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [9, 40, 270, 300])
def test_every_build_gives_the_same_int8_bits(qtype, rows):
    """Integer sums are exact in any order, and the float steps after them are the same in every build: in
    tiles of a few rows, and (40 rows of a K-quant but Q4_K; on the AVX2 and AMX builds, any) with each
    superblock decoded once for all rows. The AMX build takes rows in blocks of 256: 270 leaves a block of
    14, which takes the tiles, 300 one of 44, whose last tile product runs 12 rows past the end."""
    libs = [bind(load_library(isa)) for isa in BUILDS]
    w = random_weight(qtype, 48, 512, seed=3)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(3))
    packed = int8_packed(w)
    outs = [gemm(lib, x, packed) for lib in libs]
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), BUILDS


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_int8_stays_within_a_percent_of_float32(lib, qtype):
    """What the option costs: on normal activations the products move by under 1.5% of their largest."""
    w = random_weight(qtype, 64, 1024, seed=5)
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(5))
    exact = gemm(lib, x, pack_weight(kept_form(w)))
    approx = gemm(lib, x, int8_packed(w))
    error = ((approx - exact).abs().max() / exact.abs().max()).item()
    assert 0 < error < 0.015, error


def test_float_parts_and_other_groups_keep_float32_arithmetic(lib):
    """Parts of one matrix in several layouts, a float16 one among them: the integer parts take int8
    activations, the float part does not, and its columns are exactly the float32 path's."""
    types = [(T.Q4_K, 128), (T.Q6_K, 64), (T.F16, 32), (T.Q8_0, 64)]
    parts = [random_weight(t, n, 256, seed=i) for i, (t, n) in enumerate(types)]
    float32 = pack_parts([kept_form(p) for p in parts])
    int8 = pack_parts([kept_form(p) for p in parts])
    int8.take_int8_activations()
    assert [bool(p.struct.int8_x) for p in int8.parts()] == [True, True, False, True]
    x = torch.randn(11, 256, generator=torch.Generator().manual_seed(2))
    a, b = gemm(lib, x, float32), gemm(lib, x, int8)
    assert torch.equal(a[:, 192:224], b[:, 192:224])
    assert not torch.equal(a[:, :192], b[:, :192])
    assert_float32_close(
        b[:, :192], int8_activations(x, 256).float(), np.concatenate([p.dequantize() for p in parts[:2]])
    )
    assert_float32_close(b[:, 224:], int8_activations(x, 32).float(), parts[3].dequantize())
    for m in (1, 2, 3, 4, 7, 10):
        assert torch.equal(gemm(lib, x[:m], int8), b[:m]), m


@pytest.mark.parametrize("rows", [9, 40])
def test_k_quant_parts_stacked_keep_each_parts_bits(lib, rows):
    """Q4_K (offsets), Q6_K and Q3_K (zeros; the AVX2 build's decoded tiles take x + 128, made once a product
    where a part takes it) stacked in one matrix, as q/k/v are: each part's columns are its own product's bits."""
    parts = [random_weight(t, 32, 512, seed=i) for i, t in enumerate([T.Q4_K, T.Q6_K, T.Q3_K])]
    stacked = pack_parts([kept_form(p) for p in parts])
    stacked.take_int8_activations()
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    alone = torch.cat([gemm(lib, x, int8_packed(p)) for p in parts], dim=1)
    assert torch.equal(gemm(lib, x, stacked), alone)
