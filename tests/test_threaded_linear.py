"""threaded_linear.linear: on CPU a decode-sized product splits the weight's rows over the threads
(one batched matmul); it must give F.linear's result for every shape the model feeds it."""
import pytest
import torch
import torch.nn.functional as F

from djinnd.model import threaded_linear


# Both sum 576 fp32 products, in different orders (a batched matmul against MKL's GEMM, whose own
# blocking follows the thread count): results differ by rounding, up to ~4e-5 on sums of size ~24.
# A wrong slice or row would be off by O(1).
TOL = dict(rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 40])
@pytest.mark.parametrize("out_features", [4096, 4098, 1000])     # split evenly in 2, not in 4, not at all
def test_split_product_equals_f_linear(rows, out_features):
    g = torch.Generator().manual_seed(rows * 7 + out_features)
    w = torch.randn(out_features, 576, generator=g)
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(rows, 576, generator=g)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            torch.testing.assert_close(threaded_linear.linear(x, w, bias), F.linear(x, w, bias), **TOL)
            torch.testing.assert_close(threaded_linear.linear(x.view(1, rows, 576), w),
                                       F.linear(x.view(1, rows, 576), w), **TOL)
    finally:
        torch.set_num_threads(before)


def test_a_decode_row_over_a_large_weight_is_split_over_the_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        w, x = torch.zeros(49152, 576), torch.zeros(1, 576)
        assert threaded_linear._slices(x, w) == 2
        assert threaded_linear._slices(torch.zeros(64, 576), w) == 1          # prefill: MKL's GEMM
        assert threaded_linear._slices(x, torch.zeros(576, 576)) == 1         # too small to gain
        assert threaded_linear._slices(x, w.t().contiguous().t()) == 1        # rows not contiguous
    finally:
        torch.set_num_threads(before)
