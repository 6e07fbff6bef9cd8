"""KVBlockPool: the device KV cache, one pre-allocated tensor split into fixed-size token blocks.

Its size is the configured budget, so a small budget forces the memory paths on any device.
"""
from collections import deque

import torch


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVBlockPool:
    def __init__(self, num_layers, num_kv_heads, head_dim, block_size, budget_bytes, dtype, device):
        self.block_size = block_size
        self.block_bytes = bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        # The last block is scratch: padded decode rows write there, and no session ever holds it.
        self.num_blocks = int(budget_bytes // self.block_bytes) - 1
        if self.num_blocks < 1:
            raise ValueError(f"KV budget of {budget_bytes / 2**20:.2f} MiB holds fewer than two blocks of "
                             f"{self.block_bytes / 2**20:.2f} MiB; raise kv_cache_mb")
        self.scratch_block = self.num_blocks
        # [layer, block, slot, kv_head, head_dim]; a layer's view is what attention writes into.
        shape = (num_layers, self.num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = deque(range(self.num_blocks))

    @property
    def host_block_shape(self) -> tuple:
        """One block of all layers' K and V, as the host arena stores it: [2, layers, slots, heads, dim]."""
        layers, _, slots, heads, dim = self.k.shape
        return (2, layers, slots, heads, dim)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]):
        self._free.extend(blocks)

    def check_integrity(self, tables: list[list[int]]):
        """Every block is either free or in exactly one table."""
        held = [b for t in tables for b in t]
        assert len(held) == len(set(held)), "a block is in two tables"
        assert not set(held) & set(self._free), "a held block is also free"
        assert len(held) + len(self._free) == self.num_blocks, "blocks leaked"
