"""Host arena runs and the swapper's round trip through it, on CPU."""
import torch

from djinnd.memory.block_pool import KVBlockPool
from djinnd.memory.host_arena import HostArena
from djinnd.memory.swapper import Swapper
from djinnd.metrics import Metrics


def test_runs_are_first_fit_and_coalesce_on_free():
    arena = HostArena(10, (2, 1, 4, 1, 8), torch.float32, pin=False)
    a, b, c = arena.allocate(3), arena.allocate(3), arena.allocate(3)
    assert (a, b, c) == ([(0, 3)], [(3, 3)], [(6, 3)])
    arena.free(a)
    arena.free(c)
    assert arena.allocate(5) == [(0, 3), (6, 2)]      # no run of 5: split over the free runs
    arena.free([(0, 3), (6, 2)])
    arena.free(b)
    assert arena.num_free == 10 and arena.allocate(10) == [(0, 10)]
    arena.close()


def test_swap_out_and_in_moves_kv_exactly_to_new_blocks():
    pool = KVBlockPool(3, 2, 8, 4, 40 * 2 * 3 * 4 * 2 * 8 * 4, torch.float32, "cpu")
    pool.k.normal_()
    pool.v.normal_()
    arena = HostArena(8, pool.host_block_shape, torch.float32, pin=False)
    metrics = Metrics()
    swapper = Swapper(pool, arena, "cpu", metrics)
    blocks = [7, 2, 30]
    want_k, want_v = pool.k[:, blocks].clone(), pool.v[:, blocks].clone()
    runs = arena.allocate(3)
    swapper.swap_out(1, blocks, runs, "signal")
    pool.k[:, blocks] = 0
    pool.v[:, blocks] = 0
    fresh = [11, 0, 5]
    swapper.swap_in(1, runs, fresh, "prefetch")
    assert torch.equal(pool.k[:, fresh], want_k) and torch.equal(pool.v[:, fresh], want_v)
    assert [t.direction for t in swapper.poll()] == ["out", "in"]
    assert metrics.counters["swap_bytes_out"] == 3 * pool.block_bytes
    arena.close()


def test_pieces_never_cross_a_pinning_chunk():
    arena = HostArena(40, (2, 1, 4, 4, 8), torch.float32, pin=False, pin_chunk_bytes=16 << 10)
    assert arena.chunk_blocks == 16                 # 1 KiB blocks: 16 to a 16 KiB chunk
    assert list(arena.pieces([(10, 30)])) == [(10, 6), (16, 16), (32, 8)]
    arena.close()
