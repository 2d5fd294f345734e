"""shoal's C kernels on their own: exact against a float64 reference, and a row's bits independent of the batch."""

import pytest
import torch

from shoal.runner.cpu_kernels import gemm, load_kernel, pack_weight

kernel = load_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="shoal's C kernels could not be built here")


@pytest.mark.parametrize(("n", "k"), [(40, 24), (96, 64), (50, 7), (16, 576)])
def test_gemm_gives_each_row_the_same_bits_for_any_row_count_and_thread_count(n, k):
    g = torch.Generator().manual_seed(n * k)
    weight, bias, x = (
        torch.randn(n, k, generator=g),
        torch.randn(n, generator=g),
        torch.randn(40, k, generator=g),
    )
    packed = pack_weight(kernel, weight)
    full = gemm(kernel, x, packed, n, bias)
    reference = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(full.double(), reference, rtol=1e-5, atol=1e-5)
    for m in range(1, 40):  # every tile shape and remainder, at the start and at the end of the batch
        assert torch.equal(gemm(kernel, x[:m], packed, n, bias), full[:m]), m
        assert torch.equal(gemm(kernel, x[40 - m :], packed, n, bias), full[40 - m :]), m
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(gemm(kernel, x, packed, n, bias), full)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(gemm(kernel, x[:5], packed, n, None) + bias, full[:5])  # the bias is added last
