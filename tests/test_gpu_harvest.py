"""On CUDA: a harvest's rows, copied through pinned staging buffers behind the forward and written by
a worker thread, equal the CPU engine's rows of the same prompts, prompt by prompt and layer by layer,
across many sub-batches and a prompt longer than a staging buffer."""
import numpy as np
import pytest
import torch

from conftest import random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def harvest(device: str, prompts, layers) -> np.ndarray:
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": device, "dtype": "float32",
                                             "kv_cache_mb": 8.0, "max_num_batched_tokens": 512}))
    free = engine.pool.num_free
    try:
        desc = engine.harvester.run(1, prompts, layers)["tensor"]
        assert engine.pool.num_free == free
        return np.fromfile("/dev/shm" + desc["segment"], dtype=np.float32).reshape(desc["shape"]).copy()
    finally:
        engine.harvester.close()
        engine.close_weights()


def test_pipelined_harvest_on_cuda_equals_the_cpu_engines_rows():
    prompts = random_prompts(512, [7, 40, 3, 21, 9, 200, 16, 30, 1, 64], seed=60)   # 128-token sub-batches
    layers = [3, 0, 1]
    cuda, cpu = harvest("cuda", prompts, layers), harvest("cpu", prompts, layers)
    assert cuda.shape == (3, sum(map(len, prompts)), 64)
    np.testing.assert_allclose(cuda, cpu, rtol=1e-2, atol=1e-2)
