"""Paged prefill attention (Triton, CUDA only): prompt chunks of any number of sessions attend, in
one launch, causally to their whole context read in place through the block table. Nothing is
gathered and nothing quadratic is built, so a short chunk after a 128k prefix costs its own FLOPs.

A program owns a tile of one session's chunk (ROWS query rows = tokens x the GQA group of one KV
head, so each KV block is read once per group) and one slice of the keys that tile can see. Short
chunks over long prefixes are split over the keys (as flash-decoding splits decode) and the slices
are merged by log-sum-exp with the decode kernel's merge. Tested against `attention.prefill_attention`'s
torch path on ragged block tables.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from djinnd.model.pdl import launch_options
from djinnd.model.triton_attention import LOG2E, _merge_splits

MAX_SPLITS = 64                # the split count is an argument (no compile per count); the merge pads it to a power of 2


@triton.jit
def _key_tile(q, acc, l, m, kv, end, pos, table, k_ptr, v_ptr, head_at, d, stride_cb, stride_cs, scale_log2,
              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [kv, kv + BLOCK_N) into the running softmax (m, l, acc) of a tile's rows. CAUSAL: the tile
    straddles the diagonal or the slice's end, so keys past a row's position or `end` are masked;
    otherwise every row sees every key and the masks are skipped."""
    n = kv + tl.arange(0, BLOCK_N)
    in_range = n < end
    if CAUSAL:
        block = tl.load(table + n // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    else:
        block = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
    at = block * stride_cb + (n % BLOCK_SIZE) * stride_cs + head_at
    if CAUSAL:
        k = tl.load(k_ptr + at[:, None] + d[None, :], mask=in_range[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_ptr + at[:, None] + d[None, :]).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2          # [ROWS, BLOCK_N]
    if CAUSAL:
        s = tl.where(in_range[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = m_new
    if CAUSAL:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # a row that sees no key yet: p and alpha 0
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    if CAUSAL:
        v = tl.load(v_ptr + at[:, None] + d[None, :], mask=in_range[:, None], other=0.0).to(q.dtype)
    else:
        v = tl.load(v_ptr + at[:, None] + d[None, :]).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l * alpha + tl.sum(p, axis=1), m_new


@triton.jit(do_not_specialize=["num_splits", "stride_tb"])   # values that change step by step: one compile
def _paged_prefill(q_ptr, k_ptr, v_ptr, tables_ptr, tile_seq_ptr, tile_tok_ptr, q_start_ptr, q_len_ptr,
                   ctx_len_ptr, out_ptr, part_ptr, lse_ptr, num_splits,
                   stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb, stride_ot, stride_oh,
                   scale_log2, GROUP: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_tok_ptr + tile)           # this tile's first token, within its session's chunk
    q_start, q_len, ctx = tl.load(q_start_ptr + seq), tl.load(q_len_ptr + seq), tl.load(ctx_len_ptr + seq)
    r = tl.arange(0, ROWS)
    tok = first + r // GROUP
    live = (r < TOKENS * GROUP) & (tok < q_len)
    tok = tl.maximum(tl.minimum(tok, q_len - 1), 0)   # padding rows repeat the last token: never all -inf
    pos = ctx - q_len + tok                        # each row's position: it sees keys [0, pos]
    head = kv_head * GROUP + r % GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :])
    visible = tl.max(pos, axis=0) + 1              # keys the tile's last row sees
    per_split = tl.cdiv(tl.cdiv(visible, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, visible)
    seen_by_all = (ctx - q_len + first + 1) // BLOCK_N * BLOCK_N    # whole key tiles every row sees
    unmasked_end = tl.maximum(tl.minimum(end, seen_by_all), start)
    table = tables_ptr + seq * stride_tb
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for kv in range(start, unmasked_end, BLOCK_N):
        acc, l, m = _key_tile(q, acc, l, m, kv, end, pos, table, k_ptr, v_ptr, kv_head * stride_ch, d, stride_cb,
                              stride_cs, scale_log2, BLOCK_SIZE, BLOCK_N, PRECISION, False)
    for kv in range(unmasked_end, end, BLOCK_N):
        acc, l, m = _key_tile(q, acc, l, m, kv, end, pos, table, k_ptr, v_ptr, kv_head * stride_ch, d, stride_cb,
                              stride_cs, scale_log2, BLOCK_SIZE, BLOCK_N, PRECISION, True)
    row = q_start + tok
    if not SPLIT:
        tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=live[:, None])
    else:      # a slice past a row's position leaves l = 0: weight 0 in the merge
        has = l > 0
        part = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        at_part = (row * tl.num_programs(1) * GROUP + head) * num_splits + split    # [T, H, S] row-major
        tl.store(part_ptr + at_part[:, None] * HEAD_DIM + d[None, :], part, mask=live[:, None])
        tl.store(lse_ptr + at_part, lse, mask=live)


@dataclass
class PrefillTiles:
    """Per-forward launch plan (the same for every layer): which session and token each tile starts at."""
    tile_seq: torch.Tensor
    tile_tok: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    ctx_len: torch.Tensor
    tokens: int                   # tokens per tile: rows // group
    rows: int                     # query rows per program
    block_n: int                  # keys per loop step
    num_splits: int


def tile_shape(element_size: int) -> tuple[int, int]:
    """(query rows per program, keys per loop step); fp32 halves both (the tiles' registers)."""
    return (64, 32) if element_size >= 4 else (128, 64)


def num_splits_for(programs: int, longest: int, block_n: int, num_sms: int) -> int:
    """Key slices per tile: as many as keep every program in one round of two per SM, none shorter
    than four loop steps at the longest context, at most MAX_SPLITS (the merge's registers). A
    partial second round costs more than longer slices: on the H200 (2026-12-02, call J) 256 tokens
    after 16k ran at 231 TFLOP/s with 4 slices (256 programs) and 172 with 5; 1,024 at 335 with 1
    and 275 with 2."""
    return max(1, min(2 * num_sms // programs, longest // (4 * block_n), MAX_SPLITS))


def tile_starts(query_lens: list[int], tokens: int) -> tuple[list[int], list[int]]:
    """Each tile's (session, first token within its chunk)."""
    seq, tok = [], []
    for i, q_len in enumerate(query_lens):
        starts = range(0, q_len, tokens)
        seq += [i] * len(starts)
        tok += list(starts)
    return seq, tok


def plan(query_lens: list[int], context_lens: list[int], group: int, num_kv_heads: int, element_size: int,
         device, num_sms: int, tile: tuple[int, int] | None = None) -> PrefillTiles:
    rows, block_n = tile or tile_shape(element_size)
    tokens = max(1, rows // group)
    seq, tok = tile_starts(query_lens, tokens)
    splits = num_splits_for(len(seq) * num_kv_heads, max(context_lens), block_n, num_sms)
    q_start = [0]
    for q_len in query_lens[:-1]:
        q_start.append(q_start[-1] + q_len)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
    return PrefillTiles(as_t(seq), as_t(tok), as_t(q_start), as_t(query_lens), as_t(context_lens), tokens, rows,
                        block_n, splits)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, tiles: PrefillTiles, num_warps: int = 4,
                            num_stages: int = 3):
    """q [T, H, D] chunk tokens, session by session; k_cache/v_cache [blocks, block_size, Hkv, D] of
    one layer holding every token of each context (the chunk's own K/V already written);
    block_tables [B, max] int32. Returns [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if k_cache.element_size() == 1 and q.dtype == torch.bfloat16:
        q = q.to(torch.float16)     # as in the decode kernel: e4m3 -> fp16 is one instruction
    splits = tiles.num_splits
    part = lse = out
    if splits > 1:
        part = torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=q.device)
    _paged_prefill[(tiles.tile_seq.shape[0], num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, tiles.tile_seq, tiles.tile_tok, tiles.q_start, tiles.q_len,
        tiles.ctx_len, out, part, lse, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), head_dim ** -0.5 * LOG2E,
        GROUP=group, TOKENS=tiles.tokens, ROWS=tiles.rows, SPLIT=splits > 1, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=tiles.block_n, HEAD_DIM=head_dim, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _merge_splits[(num_tokens, num_heads)](part, lse, out, lse, out.stride(0), out.stride(1), splits,
                                               SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
                                               SLICE_TILE=0, **launch_options(q))
    return out
