"""Paged-attention decode kernel (Triton, CUDA only): one query token per session reads its K/V in
place through the block table, with an online softmax; no gather, no mask, no host-side lengths,
so a CUDA graph can replay it for any context. Tested against `attention.decode_attention_torch`.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_lens_ptr, out_ptr,
                  stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb, stride_ob, stride_oh,
                  scale, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    kv_head = h // GROUP
    ctx = tl.load(ctx_lens_ptr + b)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < ctx
        block = tl.load(tables_ptr + b * stride_tb + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, (acc / l).to(out_ptr.dtype.element_ty))


def supports(head_dim: int) -> bool:
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 256


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_n: int = 64):
    """q [B, H, D]; k_cache/v_cache [blocks, block_size, Hkv, D] of one layer; block_tables [B, max]
    int32; context_lens [B] int32 including the token itself. Returns [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    _paged_decode[(batch, num_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), head_dim ** -0.5,
        GROUP=num_heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, HEAD_DIM=head_dim,
        num_warps=4)
    return out
