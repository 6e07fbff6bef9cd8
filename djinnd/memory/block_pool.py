"""KVBlockPool: the device KV cache, one pre-allocated tensor split into fixed-size token blocks.

Its size is the configured budget, so a small budget forces the memory paths on any device.
Blocks are reference-counted (sessions share full blocks of a common prefix). A block the prefix
cache knows by content stays cached when its last holder lets go, and is reclaimed least recently
used first, only once no free block is left: cached blocks count as free.
"""
from collections import OrderedDict, deque

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
        self.refs = [0] * self.num_blocks           # holders of each block: sessions, copies in flight
        self.cached: OrderedDict[int, None] = OrderedDict()   # known blocks nobody holds, oldest first
        self.known: set[int] = set()                # blocks the prefix cache maps a content key to
        self.on_reclaim = lambda block: None        # the prefix cache forgets a block taken for reuse
        self.keeps = lambda block: False            # the prefix cache holds a known block nobody else does

    @property
    def host_block_shape(self) -> tuple:
        """One block of all layers' K and V, as the host arena stores it: [2, layers, slots, heads, dim]."""
        layers, _, slots, heads, dim = self.k.shape
        return (2, layers, slots, heads, dim)

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones, then cached ones."""
        return len(self._free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    @property
    def num_shared(self) -> int:
        return sum(1 for r in self.refs if r > 1)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = [self._take() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self.cached.popitem(last=False)
        self.known.discard(block)
        self.on_reclaim(block)
        return block

    def share(self, block: int):
        """One more holder of a block that is held or cached."""
        if self.refs[block] == 0:
            del self.cached[block]       # KeyError: neither held nor cached, a bookkeeping bug
        self.refs[block] += 1

    def free(self, blocks: list[int]):
        """Each holder lets go once; a block nobody holds is free again, or cached if it is known."""
        for b in blocks:
            if self.refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed more often than it was held")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b not in self.known:
                    self._free.append(b)
                elif self.keeps(b):
                    self.refs[b] = 1            # the prefix cache holds it until its host copy exists
                else:
                    self.cached[b] = None

    def copy_block(self, src: int, dst: int):
        """Copy-on-write: dst takes src's K/V (all layers), on the compute stream."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def check_integrity(self, tables: list[list[int]], in_flight: list[int] = ()):
        """Each block's count is its holders (tables, copies in flight); the rest is free or cached."""
        held = [b for t in tables for b in t] + list(in_flight)
        counts = [0] * self.num_blocks
        for b in held:
            counts[b] += 1
        assert counts == self.refs, "a block's reference count does not match its holders"
        idle = set(self._free) | set(self.cached)
        assert not set(held) & idle, "a held block is also free"
        assert len(set(held)) + len(idle) == self.num_blocks, "blocks leaked"
        assert set(self.cached) <= self.known, "a cached block has no content key"
