"""Paged attention over the KV block pool, in its two shapes.

Prefill (a chunk of new tokens per session, after its cached prefix): with its K/V written by slot,
each session attends over its blocks with causal SDPA, bottom-right aligned so the chunk
sees the whole prefix (no padded batch, no dense mask). Decode (one token per session): the
Triton kernel in `triton_attention.py` reads K/V in place through the block table; the torch
function here is the CPU path and the reference the kernel is tested against.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass
class ForwardContext:
    """What every layer of one forward shares: rotary tables for its tokens, the cache slot each
    token's K/V goes to (the layer writes it before attending), and how to attend."""
    cos: torch.Tensor             # [T, 1, head_dim]
    sin: torch.Tensor
    slots: torch.Tensor           # [T] flat slot (block * block_size + offset) of each token's K/V
    attend: Callable              # (q [T,H,D], k, v [T,Hkv,D], k_cache, v_cache) -> [T,H,D], K/V written
    fused: object = None          # triton_fused on CUDA: one kernel each for norm, RoPE + K/V write, SiLU-mul


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """k/v [T, Hkv, D] into the flat slots of one layer's cache [blocks, block_size, Hkv, D]; an fp8
    cache stores them saturated to its range (e4m3 has no inf: an overflow would be NaN)."""
    for x, cache in ((k, k_cache), (v, v_cache)):
        if cache.dtype != x.dtype:
            top = torch.finfo(cache.dtype).max
            x = x.clamp(-top, top).to(cache.dtype).view(torch.uint8)     # fp8 has no index_copy_: copy bytes
            cache = cache.view(torch.uint8)
        cache.view(-1, *x.shape[1:]).index_copy_(0, slot_mapping, x)


def gather_blocks(cache, blocks, dtype):
    """Blocks [n, block_size, Hkv, D] of one layer's cache in the compute dtype; an fp8 cache (read
    as its values, scale 1) is gathered as bytes, since CUDA has no fp8 index kernels."""
    if cache.dtype == dtype:
        return cache.index_select(0, blocks)
    return cache.view(torch.uint8).index_select(0, blocks).view(cache.dtype).to(dtype)


@dataclass
class PrefillMetadata:
    positions: torch.Tensor       # [T] position of each token in its session
    slot_mapping: torch.Tensor    # [T] flat slot (block * block_size + offset) each token's K/V goes to
    block_tables: torch.Tensor    # [B, max_blocks] padded with 0 (never read past a context)
    query_lens: list[int]         # tokens fed this step per session
    context_lens: list[int]       # tokens in its KV after the step
    last_token_index: torch.Tensor  # [B] index in [T] of each session's last token
    block_size: int
    tiles: object = None          # the paged prefill kernel's launch plan, made at the first layer


def build_prefill_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                           block_size: int, device) -> PrefillMetadata:
    positions = torch.cat([torch.arange(c - q, c) for q, c in zip(query_lens, context_lens)])
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))   # [T] session index
    slots = tables[seq, positions // block_size] * block_size + positions % block_size
    to = dict(device=device, non_blocking=True)
    return PrefillMetadata(positions.to(**to), slots.to(**to), tables.to(**to), query_lens, context_lens,
                           (torch.tensor(query_lens).cumsum(0) - 1).to(**to), block_size)


def prefill_attention(q, k, v, k_cache, v_cache, meta: PrefillMetadata, kernel=None):
    """q [T, H, D], k/v [T, Hkv, D]; each session's chunk attends causally to its prefix and itself.
    With `kernel` (engine/kernels.py) every chunk after a cached prefix reads it in place, all in one
    launch; without one, or when no chunk has a prefix, FlashAttention/SDPA per session. The chunks'
    K/V must be in the cache already (the layer writes them by meta.slot_mapping)."""
    if kernel is not None and meta.query_lens != meta.context_lens:
        return kernel(q, k_cache, v_cache, meta)
    out, start = torch.empty_like(q), 0
    gqa = q.shape[1] != k.shape[1]
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        qi = q[start:start + q_len].transpose(0, 1)[None]                      # [1, H, q, D]
        if q_len == ctx:       # no cached prefix: the chunk's own K/V, plain causal
            ki, vi, mask, causal = k[start:start + q_len], v[start:start + q_len], None, True
        else:
            blocks = meta.block_tables[i, :-(-ctx // meta.block_size)]
            ki = gather_blocks(k_cache, blocks, q.dtype).flatten(0, 1)[:ctx]               # [ctx, Hkv, D]
            vi = gather_blocks(v_cache, blocks, q.dtype).flatten(0, 1)[:ctx]
            mask, causal = causal_lower_right(q_len, ctx), False
        ki, vi = ki.transpose(0, 1)[None], vi.transpose(0, 1)[None]
        if mask is not None and qi.is_cuda and qi.dtype in (torch.float16, torch.bfloat16) and qi.shape[-1] <= 256:
            o = _flash_bottom_right(qi, ki, vi)
        else:
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        out[start:start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def _flash_bottom_right(q, k, v):
    """q [1, H, q, D] after a prefix: k/v [1, Hkv, ctx, D]. FlashAttention-2 aligns its causal mask
    bottom-right and reads GQA heads natively, so a 2k chunk over a 128k prefix costs no mask and no
    expanded copy (SDPA's lower-right bias may fall back to a materialized q x ctx mask)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]


def decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, num_blocks: int):
    """q [B, H, D] one token per session; block_tables [B, >= num_blocks]; context_lens [B] include the
    token itself. Reference path: gathers num_blocks blocks per session and masks past the context."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    tables = block_tables[:, :num_blocks].reshape(-1)     # index_select: on CPU a 2-D index is 100x slower
    keys = gather_blocks(k_cache, tables, q.dtype).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = gather_blocks(v_cache, tables, q.dtype).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    if batch == 1 and not q.is_cuda:    # one session on CPU: cut at its length (free to read), no mask ops
        n = int(context_lens[0])
        return F.scaled_dot_product_attention(q[:, :, None], keys[:, :, :n], values[:, :, :n],
                                              enable_gqa=num_heads != num_kv_heads)[:, :, 0]
    visible = torch.arange(keys.shape[2], device=q.device)[None, :] < context_lens[:, None]   # [B, K]
    hidden = ~visible[:, None, :, None]                     # blocks it does not own may hold NaN: 0 x NaN is NaN
    keys, values = keys.masked_fill_(hidden, 0), values.masked_fill_(hidden, 0)   # in place: gathered copies
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible[:, None, None, :],
                                         enable_gqa=num_heads != num_kv_heads)
    return out[:, :, 0]
