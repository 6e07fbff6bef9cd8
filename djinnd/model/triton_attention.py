"""Paged-attention decode kernels (Triton, CUDA only): one query token per session reads its K/V in
place through the block table. Split-K (flash-decoding): each program owns one KV head for its whole
GQA group and one slice of the sequence, so a 32k context at batch 1 still fills the GPU and each KV
block is read once per group; a second kernel merges the slices by log-sum-exp. The split count is
fixed per batch size and the slices follow each session's length on the device: no host-side
lengths, so a CUDA graph replays it for any context. Tested against `attention.decode_attention_torch`.
"""
import torch
import triton
import triton.language as tl

from djinnd.model.pdl import launch_options, wait_for_previous

LOG2E = 1.4426950408889634


@triton.jit
def _slice_tokens(ctx, num_splits, BLOCK_N: tl.constexpr):
    """Tokens in each of a session's slices: its context over the splits, in whole tiles."""
    return tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _split_decode(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_lens_ptr, out_ptr, part_ptr, lse_ptr,
                  stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb, stride_ob, stride_oh,
                  scale_log2, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PRECISION: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_lens_ptr + b)
    per_split = _slice_tokens(ctx, NUM_SPLITS, BLOCK_N)
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)
    g = tl.arange(0, BLOCK_H)                      # query heads of the group, padded for tl.dot
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None],
                other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        valid = n < end
        block = tl.load(tables_ptr + b * stride_tb + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        if BLOCK_N % BLOCK_SIZE == 0:     # tiles start on a page: offsets within pages are loop-invariant
            in_page = tl.arange(0, BLOCK_N) % BLOCK_SIZE
        else:
            in_page = n % BLOCK_SIZE
        row = block * stride_cb + in_page * stride_cs + kv_head * stride_ch
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)  # fp8 cache too
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2          # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    is_head = g < GROUP
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=is_head[:, None])
    else:      # a slice past the context (short context) stores nothing: the merge reads only slices in it
        mine = is_head & (l > 0)                   # l > 0: the slice holds a token
        part = acc / tl.where(mine, l, 1.0)[:, None]
        lse = m + tl.log2(tl.where(mine, l, 1.0))
        at = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split          # [B, H, S] row-major
        tl.store(part_ptr + at[:, None] * HEAD_DIM + d[None, :], part, mask=mine[:, None])
        tl.store(lse_ptr + at, lse, mask=mine)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits(part_ptr, lse_ptr, out_ptr, ctx_lens_ptr, stride_ob, stride_oh, num_splits,
                  SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SLICE_TILE: tl.constexpr, PDL: tl.constexpr):
    """Out = the slices' parts weighted by their log-sum-exp. SLICE_TILE > 0 (decode): slices were
    cut as _split_decode cuts them, and those past the session's context hold nothing, unread;
    0 (prefill): every slice was stored, an empty one as lse -inf."""
    wait_for_previous(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    used = num_splits
    if SLICE_TILE > 0:
        ctx = tl.load(ctx_lens_ptr + b)
        used = tl.cdiv(ctx, _slice_tokens(ctx, num_splits, SLICE_TILE))
    row = (b * tl.num_programs(1) + h) * num_splits + s
    lse = tl.load(lse_ptr + row, mask=s < used, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))         # at least one slice holds a token: max is finite
    part = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=(s < used)[:, None], other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def supports(head_dim: int) -> bool:
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 256


def tile_for(element_size: int, batch: int) -> int:
    """Tokens per tile. The loop is bound by memory latency, so wider tiles keep more bytes in flight
    where programs are few per slice. Measured on the H200 (2026-12-02, bench_decode_kernel.py):
    b32 at 8k, 128 read bf16 KV at 4,209 GB/s against 3,728 with 64, fp8 2,492 against 2,092; b1 at
    32k, bf16 was faster with 64 and fp8 with 128. fp32 keeps 64 (the tiles' registers)."""
    if element_size >= 4 or element_size == 2 and batch < 8:
        return 64
    return 128


def num_splits_for(batch: int, num_kv_heads: int, max_context: int, num_sms: int, block_n: int = 64) -> int:
    """Slices per (session, KV head): enough programs for about four per SM, no slice shorter than
    four tiles at the longest context (a slice that finds no tokens returns at once), and at most 64
    (the merge holds every slice of a head in registers)."""
    programs = batch * num_kv_heads
    wanted = -(-4 * num_sms // programs)
    return max(1, min(wanted, max_context // (4 * block_n), 64))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, num_splits: int = 1,
                           block_n: int = 64, num_warps: int = 4, num_stages: int = 3):
    """q [B, H, D]; k_cache/v_cache [blocks, block_size, Hkv, D] of one layer; block_tables [B, max]
    int32; context_lens [B] int32 including the token itself. Returns [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if k_cache.element_size() == 1 and q.dtype == torch.bfloat16:
        q = q.to(torch.float16)     # the tiles convert to q's dtype: e4m3 -> fp16 is one instruction, -> bf16 is not
    part = lse = out                       # unused when there is one slice
    if num_splits > 1:
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _split_decode[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), head_dim ** -0.5 * LOG2E,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), NUM_SPLITS=num_splits,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, HEAD_DIM=head_dim,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
        num_stages=num_stages, **launch_options(q))
    if num_splits > 1:
        _merge_splits[(batch, num_heads)](part, lse, out, context_lens, out.stride(0), out.stride(1), num_splits,
                                          SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
                                          SLICE_TILE=block_n, **launch_options(q))
    return out
