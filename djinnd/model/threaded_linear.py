"""Linear layers for decode on CPU. MKL runs a product with a few rows (a decode step's batch) on one
thread, so the weight's read, which is the whole cost, goes at one core's rate. Splitting the
weight's rows into one slice per thread, as one batched matmul, reads them in parallel. On the
2-core machine (2026-12-02, fp32) the embedded model's lm_head, 49,152 x 576 at one row, read at
11 GB/s as one product and at 20 GB/s in two slices. CUDA and many rows use F.linear as they are.
"""
import torch
import torch.nn.functional as F

MAX_ROWS = 16                 # decode batches; longer inputs (prefill) get MKL's own threaded GEMM
MIN_WEIGHT = 1 << 19          # elements; a smaller weight gains nothing from the split (576 x 576 did not)
MAX_SLICES = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    slices = _slices(x, weight)
    if slices < 2:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features).unsqueeze(0).expand(slices, -1, -1)
    y = torch.bmm(rows, weight.view(slices, out_features // slices, in_features).transpose(1, 2))
    y = y.transpose(0, 1).reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def _slices(x: torch.Tensor, weight: torch.Tensor) -> int:
    if x.device.type != "cpu" or weight.numel() < MIN_WEIGHT or x.numel() > MAX_ROWS * x.shape[-1]:
        return 1
    slices = min(torch.get_num_threads(), MAX_SLICES)
    while slices > 1 and weight.shape[0] % slices:
        slices -= 1
    return slices if weight.is_contiguous() else 1
