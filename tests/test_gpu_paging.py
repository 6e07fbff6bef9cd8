"""On CUDA: KV swapped to the pinned host arena and back on side streams gives exactly the tokens
of the same calls on a never-swapped engine, for lazy (low-water) and pressure-driven eviction."""
import pytest
import torch

from conftest import hf_greedy, hf_reference, random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def two_turns(policy: str, kv_cache_mb: float, signal: bool, low_water: float = 0.1):
    """8 sessions: turn one, a tool call (IO_WAIT), turn two. Returns tokens and swap counters."""
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": kv_cache_mb, "host_arena_mb": 8.0, "policy": policy,
                                             "evict_low_water": low_water}))
    engine.arena.wait_pinned()
    engine.start()
    client = LocalClient(engine)
    prompts = random_prompts(engine.loaded.model.args.vocab_size, [30, 31, 32, 33, 34, 35, 36, 37], seed=4)
    sessions = [client.open() for _ in prompts]
    firsts = []
    for s, p in zip(sessions, prompts):
        firsts.append(client.done(client.submit(s, p, 20))[0].tokens)
        if signal:
            client.set_phase(s, "IO_WAIT", expected_s=5.0)
    seconds = [client.done(client.submit(s, [7, 8], 10))[0].tokens for s in sessions]
    engine.stop()
    engine.join()
    engine.arena.close()
    return engine, prompts, firsts, seconds


def test_swapped_sessions_match_a_never_swapped_run_on_cuda():
    _, prompts, ref_firsts, ref_seconds = two_turns("none", 64.0, signal=False)
    for kv_mb, low_water in ((0.25, 0.1), (4.0, 1.0)):   # 16 blocks: pressure; or room for all, but
        engine, _, firsts, seconds = two_turns("semantic", kv_mb, signal=True, low_water=low_water)  # lazy eviction
        assert engine.metrics.counters["swaps_out"] >= 8 and engine.metrics.counters["swaps_in"] >= 4
        assert engine.arena.pin_seconds is not None
        assert (firsts, seconds) == (ref_firsts, ref_seconds)
    hf = hf_reference(engine.loaded.model).cuda()
    assert all(f == hf_greedy(hf, p, 20) for p, f in zip(prompts, firsts))
