"""Fused elementwise kernels for the decode step (Triton, CUDA only). At batch 1 a layer's matmuls
take microseconds, so the many small kernels of RMSNorm, RoPE, the K/V write and SiLU-mul cost as
much as the weights' reads; each becomes one kernel here, RoPE and the K/V write one together.
The module also carries the layers' product, `linear` (triton_gemv.py).
`llama.py` keeps the torch versions as the CPU path and as the reference these are tested against.
"""
import torch
import triton
import triton.language as tl

from djinnd.model import triton_gemv
from djinnd.model.pdl import launch_options, wait_for_previous


@triton.jit
def _add_rms_norm(x_ptr, residual_ptr, weight_ptr, out_ptr, n_cols, eps, HAS_RESIDUAL: tl.constexpr,
                  BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
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
                                 num_warps=8, **launch_options(x))
    return out


@triton.jit
def _rotate(base, c1, s1, c2, s2, d, HALF: tl.constexpr):
    """Rotate one head at `base` in place (computed in fp32, stored in its dtype); returns the halves."""
    x1 = tl.load(base + d).to(tl.float32)
    x2 = tl.load(base + HALF + d).to(tl.float32)
    y1 = (x1 * c1 - x2 * s1).to(base.dtype.element_ty)
    y2 = (x2 * c2 + x1 * s2).to(base.dtype.element_ty)
    tl.store(base + d, y1)
    tl.store(base + HALF + d, y2)
    return y1, y2


@triton.jit
def _store_cache(ptr, x, cols, TOP: tl.constexpr):
    if TOP > 0:         # an fp8 cache: saturate to its range (e4m3 has no inf: an overflow would be NaN)
        x = tl.minimum(tl.maximum(x.to(tl.float32), -TOP), TOP)
    tl.store(ptr + cols, x.to(ptr.dtype.element_ty))


@triton.jit
def _rope_write_kv(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_slot, num_heads,
                   HALF: tl.constexpr, TOP: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    t, h = tl.program_id(0), tl.program_id(1)      # heads [0, num_heads) are q's, the rest k's (and v's)
    d = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + t * 2 * HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + t * 2 * HALF + d).to(tl.float32)
    c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + d).to(tl.float32)
    s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + d).to(tl.float32)
    if h < num_heads:
        _rotate(q_ptr + t * stride_qt + h * stride_qh, c1, s1, c2, s2, d, HALF)
    else:
        kv_head = h - num_heads
        y1, y2 = _rotate(k_ptr + t * stride_kt + kv_head * stride_kh, c1, s1, c2, s2, d, HALF)
        at = tl.load(slots_ptr + t).to(tl.int64) * stride_slot + kv_head * 2 * HALF
        _store_cache(k_cache_ptr + at, y1, d, TOP)
        _store_cache(k_cache_ptr + at + HALF, y2, d, TOP)
        v = tl.load(v_ptr + t * stride_vt + kv_head * stride_vh + tl.arange(0, 2 * HALF))
        _store_cache(v_cache_ptr + at, v, tl.arange(0, 2 * HALF), TOP)


def rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots):
    """One kernel: rotate q [T, H, D] and k [T, Hkv, D] in place (strided views are fine) and write k
    and v [T, Hkv, D] into the flat slots of one layer's cache [blocks, block_size, Hkv, D], as
    `attention.write_kv` does after `rope.apply_rope`. cos/sin [T, 1, D] contiguous."""
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == k.stride(2) == v.stride(2) == 1
    top = torch.finfo(k_cache.dtype).max if k_cache.dtype != k.dtype else 0.0
    _rope_write_kv[(q.shape[0], q.shape[1] + k.shape[1])](
        q, k, v, cos, sin, slots, k_cache, v_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(1), q.shape[1], HALF=q.shape[2] // 2, TOP=top,
        **launch_options(q))


@triton.jit
def _silu_mul(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
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
    _silu_mul[(rows, triton.cdiv(n_cols, 1024))](gate_up, out, n_cols, BLOCK=1024, **launch_options(gate_up))
    return out


linear = triton_gemv.linear          # the layers' products: a GEMV where the step has one row


def supports(x: torch.Tensor) -> bool:
    return x.is_cuda
