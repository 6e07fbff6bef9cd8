"""kv_cache_dtype fp8_e4m3: the pool holds fp8 (half the bytes), swaps move its bytes through the
host arena unchanged, and generation runs: the first token (computed from the prompt's own K/V)
equals the fp32 pool's, and the daemon refuses fp8 with tensor parallelism by name."""
import pytest
import torch

from conftest import random_prompts
from djinnd.config import ConfigError, load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.memory.block_pool import KVBlockPool, bytes_per_block
from djinnd.memory.host_arena import HostArena
from djinnd.memory.swapper import Swapper
from djinnd.metrics import Metrics


def test_swaps_move_fp8_blocks_bytewise():
    per = bytes_per_block(2, 2, 8, 4, torch.float8_e4m3fn)
    pool = KVBlockPool(2, 2, 8, 4, per * 9, torch.float8_e4m3fn, "cpu")
    arena = HostArena(4, pool.host_block_shape, torch.uint8, pin=False)
    swapper = Swapper(pool, arena, "cpu", Metrics())
    pool.k.copy_(torch.randn(pool.k.shape).to(torch.float8_e4m3fn))
    pool.v.copy_(torch.randn(pool.v.shape).to(torch.float8_e4m3fn))
    before = pool.k[:, [1, 5]].view(torch.uint8).clone(), pool.v[:, [1, 5]].view(torch.uint8).clone()
    runs = arena.allocate(2)
    swapper.swap_out(1, [1, 5], runs, "test")
    swapper.swap_in(1, runs, [2, 7], "test")
    assert torch.equal(pool.k[:, [2, 7]].view(torch.uint8), before[0])
    assert torch.equal(pool.v[:, [2, 7]].view(torch.uint8), before[1])


def first_tokens(kv_cache_dtype: str):
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "dtype": "float32",
                                             "kv_cache_mb": 8.0, "kv_cache_dtype": kv_cache_dtype}))
    engine.start()
    client = LocalClient(engine)
    pending = [client.submit(client.open(), p, 12) for p in random_prompts(512, [7, 40, 3], seed=9)]
    outs = [client.done(e)[0].tokens for e in pending]
    engine.stop()
    engine.join()
    return engine.pool.k.dtype, outs


def test_an_fp8_pool_generates_and_its_first_tokens_equal_the_fp32_pools():
    dtype, fp8 = first_tokens("fp8_e4m3")
    _, fp32 = first_tokens("auto")
    assert dtype == torch.float8_e4m3fn and all(len(t) == 12 for t in fp8)
    assert [t[0] for t in fp8] == [t[0] for t in fp32]


def test_fp8_with_tensor_parallel_is_refused_by_name():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        load_config(None, {"kv_cache_dtype": "fp8_e4m3", "tensor_parallel": 2})
