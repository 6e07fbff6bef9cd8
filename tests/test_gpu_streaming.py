"""On CUDA: a streamed model (layers through the ring on a copy stream) gives the logits and tokens of
the same model held resident, on the same device and dtype."""
import gc

import pytest
import torch

from conftest import random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from experiments.exp2_streaming import prompt_logits  # noqa: E402  (logits after a prefill, outside any session)

MODEL = "random:llama-2-7b"      # 12.6 GiB in float16: layers of 386 MiB, so copies take real time


def engine_for(**overrides):
    return build_engine(load_config(None, {"model": MODEL, "device": "cuda", "dtype": "float16",
                                           "kv_cache_mb": 1024.0, "max_num_seqs": 8, **overrides}))


def run(engine, prompts):
    logits = [prompt_logits(engine, p) for p in prompts]
    engine.start()
    client = LocalClient(engine)
    pending = [client.submit(client.open(), p, 16) for p in prompts]
    tokens = [client.done(e)[0].tokens for e in pending]
    engine.stop()
    engine.join()
    return logits, tokens


def test_streamed_logits_and_tokens_equal_resident_on_cuda():
    prompts = random_prompts(32000, [7, 300, 64], seed=41)
    resident = run(engine_for(export_weights=False), prompts)   # an exported buffer's IPC handle pins it for good
    gc.collect()
    torch.cuda.empty_cache()
    # What the stopped resident engine still holds in this process (H200 2026-12-02: ~1.3 GiB) is not
    # the streamed engine's footprint, which is what the bound below is about.
    leftover = torch.cuda.memory_allocated()
    engine = engine_for(weights_budget_mb=4096.0, prefetch_depth=2, stream_chunk_mb=64.0)
    streamer = engine.loaded.model.streamer
    assert streamer is not None and streamer.num_streamed > 20
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    streamed = run(engine, prompts)
    peak = torch.cuda.max_memory_allocated()
    assert peak - leftover < (4096 + 1024 + 1024) * 2**20   # weights budget (ring included) + KV pool + activations
    for a, b in zip(resident[0], streamed[0]):
        assert torch.equal(a, b), (a - b).abs().max()        # same bits: same kernels on the same weights
    assert streamed[1] == resident[1]
    assert streamer.status()["bytes_streamed"] > 20 * streamer.status()["streamed_bytes"]
