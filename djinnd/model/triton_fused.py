"""Fused elementwise kernels for the decode step (Triton, CUDA only). At batch 1 a layer's matmuls
take microseconds, so the many small kernels of RMSNorm, RoPE and SiLU-mul cost as much as the
weights' reads; each becomes one kernel here. `llama.py` keeps the torch versions as the CPU path
and as the reference these are tested against.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(x_ptr, residual_ptr, weight_ptr, out_ptr, n_cols, eps, HAS_RESIDUAL: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:   # residual += x, and normalize the sum (the sum rounds to the model dtype first, as in torch)
        x = (x + tl.load(residual_ptr + row * n_cols + cols, mask=mask, other=0.0)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm of x [T, hidden]; with `residual`, first residual += x in place and normalize that."""
    out = torch.empty_like(x)
    _add_rms_norm[(x.shape[0],)](x, residual if residual is not None else x, weight, out, x.shape[1], eps,
                                 HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]),
                                 num_warps=8)
    return out


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, num_heads, HALF: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, HALF)
    base = x_ptr + t * stride_t + h * stride_h
    x1 = tl.load(base + d).to(tl.float32)
    x2 = tl.load(base + HALF + d).to(tl.float32)
    c1 = tl.load(cos_ptr + t * 2 * HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + t * 2 * HALF + d).to(tl.float32)
    c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + d).to(tl.float32)
    s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + d).to(tl.float32)
    tl.store(base + d, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty))
    tl.store(base + HALF + d, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty))


def rope_(x, cos, sin):
    """Rotate x [T, heads, D] in place (a strided view is fine); cos/sin [T, 1, D] contiguous."""
    _rope[(x.shape[0], x.shape[1])](x, cos, sin, x.stride(0), x.stride(1), x.shape[1], HALF=x.shape[2] // 2)
    return x


@triton.jit
def _silu_mul(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n_cols + cols, silu * up, mask=mask)


def silu_mul(gate_up):
    """[T, 2 * inter] (gate | up) -> silu(gate) * up [T, inter]."""
    rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, n_cols)
    _silu_mul[(rows, triton.cdiv(n_cols, 1024))](gate_up, out, n_cols, BLOCK=1024)
    return out


def supports(x: torch.Tensor) -> bool:
    return x.is_cuda
