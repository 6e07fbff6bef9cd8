"""On CUDA: KV swapped to the pinned host arena and back on side streams gives the tokens of an
unswapped run, for signal-driven and pressure-driven eviction."""
import pytest
import torch

from conftest import hf_greedy, hf_reference, random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def test_swapped_sessions_match_hf_on_cuda():
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 0.25, "host_arena_mb": 8.0}))
    engine.arena.wait_pinned()
    engine.start()
    client = LocalClient(engine)
    prompts = random_prompts(engine.loaded.model.args.vocab_size, [30, 31, 32, 33, 34, 35, 36, 37], seed=4)
    sessions = [client.open() for _ in prompts]
    firsts = []
    for s, p in zip(sessions, prompts):        # 8 sessions x 4 blocks in a 16-block pool: pressure
        firsts.append(client.done(client.submit(s, p, 20))[0].tokens)
        client.set_phase(s, "IO_WAIT", expected_s=0.05)
    seconds = [client.done(client.submit(s, [7, 8], 10))[0].tokens for s in sessions]
    engine.stop()
    engine.join()
    swaps = engine.metrics.counters
    assert swaps["swaps_out"] >= 8 and swaps["swaps_in"] >= 8
    assert engine.arena.pin_seconds is not None
    hf = hf_reference(engine.loaded.model).cuda()
    for p, first, second in zip(prompts, firsts, seconds):
        assert first == hf_greedy(hf, p, 20)
        assert second == hf_greedy(hf, p + first + [7, 8], 10)
    engine.arena.close()
