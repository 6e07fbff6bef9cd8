"""On CUDA: a harvest's rows, copied through pinned staging buffers behind the forward and written by
a worker thread, equal the rows of each prompt's own forward copied at once, layer by layer, across
many sub-batches and a prompt longer than a staging buffer."""
import numpy as np
import pytest
import torch

from conftest import random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.session import Session

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def test_pipelined_harvest_on_cuda_equals_rows_copied_at_once():
    """One CUDA engine (random weights are drawn per device): the pipelined harvest's rows equal each
    prompt's forward with every captured layer copied to the host synchronously."""
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 8.0, "max_num_batched_tokens": 512}))
    prompts = random_prompts(512, [7, 40, 3, 21, 9, 200, 16, 30, 1, 64], seed=60)   # 128-token sub-batches
    layers = [3, 0, 1]
    pool, free = engine.pool, engine.pool.num_free
    try:
        desc = engine.harvester.run(1, prompts, layers)["tensor"]
        assert pool.num_free == free
        got = np.fromfile("/dev/shm" + desc["segment"], dtype=np.float32).reshape(desc["shape"])
        assert got.shape == (3, sum(map(len, prompts)), 64)
        want = np.concatenate([rows_at_once(engine, p, layers) for p in prompts], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    finally:
        engine.harvester.close()
        engine.close_weights()


def rows_at_once(engine, prompt, layers) -> np.ndarray:
    pool, rows = engine.pool, {}
    s = Session(0, 1, 0, tokens=list(prompt), block_table=pool.allocate(pool.blocks_for(len(prompt))))
    try:
        def after(i, h):
            if i in layers:
                rows[i] = h.float().cpu().numpy()
            return h
        engine.runner.forward([(s, len(prompt))], 0, max(layers) + 1, after=after)
    finally:
        pool.free(s.block_table)
    return np.stack([rows[layer] for layer in layers])
