"""The batch-1 GEMV kernel, run by Triton's interpreter on CPU tensors, equals F.linear: rows read in
one load and in several (in_features above the largest load), with and without a bias; and `fits`
sends only one half-precision row on CUDA to it. Skipped where Triton is not installed, and on CUDA
machines (tests/test_gpu_kernels.py runs the compiled kernel there)."""
import json

import pytest
import torch

from conftest import require_triton_interpreter, run_interpreted

require_triton_interpreter("the compiled kernel is tested in test_gpu_kernels.py")

CHILD = """
import json, sys, torch
import torch.nn.functional as F
from djinnd.model import triton_gemv
triton_gemv.MAX_BLOCK_K = 512                      # so 1,536 columns take three loads
errors = []
for out_f, in_f, with_bias in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(out_f + in_f)
    x, w = torch.randn(1, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
    bias = torch.randn(out_f, generator=g) if with_bias else None
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    errors.append(((triton_gemv.gemv(x, w, bias).double() - ref).norm() / ref.norm()).item())
print(json.dumps(errors))
"""


def test_gemv_equals_f_linear():
    errors = run_interpreted(CHILD, json.dumps([(8, 256, False), (12, 1536, True), (4, 512, True)]))
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("rows,dtype,shape,expected", [
    (1, torch.bfloat16, (4096, 4096), True), (1, torch.float16, (6144, 14336), True),
    (2, torch.bfloat16, (4096, 4096), False), (1, torch.float32, (4096, 4096), False),
    (1, torch.bfloat16, (4098, 4096), False), (1, torch.bfloat16, (4096, 100), False)])
def test_only_one_half_precision_row_on_cuda_fits(rows, dtype, shape, expected):
    from djinnd.model import triton_gemv
    x, w = torch.empty(rows, shape[1], dtype=dtype), torch.empty(shape, dtype=dtype)
    assert not triton_gemv.fits(x, w)                            # CPU tensors: never
    cuda_like = type("T", (), {"is_cuda": True, "numel": x.numel, "shape": x.shape, "dtype": x.dtype})()  # no GPU here
    assert triton_gemv.fits(cuda_like, w) == expected
