"""Paged attention over the KV block pool: write this step's K/V by slot, attend over each session's blocks.

The torch path below runs on CPU and GPU with the same results. Linear layers see the batch as a
flat run of tokens [T, ...]; only attention pads it to [B, max_q] queries x [B, max_k] keys.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    positions: torch.Tensor       # [T] position of each token in its session
    slot_mapping: torch.Tensor    # [T] flat slot (block * block_size + offset) each token's K/V goes to
    block_tables: torch.Tensor    # [B, max_blocks] padded with 0 (masked out below)
    q_pad_index: torch.Tensor     # [T] where each token sits in the padded [B * max_q] query layout
    attn_mask: torch.Tensor       # [B, 1, max_q, max_k] True where a query may see a key
    max_query_len: int
    max_context_len: int
    last_token_index: torch.Tensor  # [B] index in [T] of each session's last token


def build_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                   block_size: int, device) -> AttentionMetadata:
    """query_lens: tokens fed this step per session; context_lens: tokens in its KV after the step."""
    positions, slots, pad_index = [], [], []
    max_q, max_k = max(query_lens), max(context_lens)
    for i, (q, ctx, table) in enumerate(zip(query_lens, context_lens, block_tables)):
        for pos in range(ctx - q, ctx):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        pad_index.extend(range(i * max_q, i * max_q + q))
    max_blocks = -(-max_k // block_size)
    tables = torch.zeros(len(query_lens), max_blocks, dtype=torch.long)
    for i, table in enumerate(block_tables):
        n = min(len(table), max_blocks)
        tables[i, :n] = torch.tensor(table[:n])
    q_lens = torch.tensor(query_lens)
    ctx_lens = torch.tensor(context_lens)
    # Query row r of session i sits at position ctx_i - q_i + r; key j is visible if j <= that.
    q_pos = (ctx_lens - q_lens)[:, None] + torch.arange(max_q)[None, :]
    key = torch.arange(max_k)
    mask = (key[None, None, :] <= q_pos[:, :, None]) & (key[None, None, :] < ctx_lens[:, None, None])
    to = dict(device=device, non_blocking=True)
    return AttentionMetadata(
        positions=torch.tensor(positions).to(**to),
        slot_mapping=torch.tensor(slots).to(**to),
        block_tables=tables.to(**to),
        q_pad_index=torch.tensor(pad_index).to(**to),
        attn_mask=mask[:, None].to(**to),
        max_query_len=max_q,
        max_context_len=max_k,
        last_token_index=(torch.cumsum(q_lens, 0) - 1).to(**to),
    )


def paged_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata):
    """q [T, H, D], k/v [T, Hkv, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] of one layer."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    batch = meta.block_tables.shape[0]
    keys = k_cache[meta.block_tables].view(batch, -1, num_kv_heads, head_dim)[:, :meta.max_context_len]
    values = v_cache[meta.block_tables].view(batch, -1, num_kv_heads, head_dim)[:, :meta.max_context_len]
    padded = q.new_zeros(batch * meta.max_query_len, num_heads, head_dim)
    padded[meta.q_pad_index] = q
    padded = padded.view(batch, meta.max_query_len, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=meta.attn_mask, enable_gqa=num_heads != num_kv_heads)
    return out.transpose(1, 2).reshape(-1, num_heads, head_dim)[meta.q_pad_index]
