"""On CUDA: a prefetch that takes an idle session's blocks starts its copy in right after that
session's copy out, ordered on the device; every token equals a never-swapped run."""
import time

import pytest
import torch

from conftest import random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def tool_call_under_pressure(policy: str, kv_cache_mb: float):
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": kv_cache_mb, "host_arena_mb": 8.0, "policy": policy,
                                             "prefetch_lead_ms": 100.0}))
    engine.arena.wait_pinned()
    engine.start()
    client = LocalClient(engine)
    run = lambda s, ids, n: client.done(client.submit(s, ids, n))[0].tokens  # noqa: E731
    a, b = client.open(), client.open()
    pa, pb = random_prompts(engine.loaded.model.args.vocab_size, [40, 80], seed=5)
    tokens = [run(a, pa, 8)]                      # a: 48 tokens, 3 of the 8 blocks
    client.set_phase(a, "IO_WAIT", expected_s=0.4)
    tokens.append(run(b, pb, 10))                 # b: 6 blocks, so a leaves (pressure)
    time.sleep(0.6)                               # a's prefetch at 0.3 s takes idle b's blocks
    client.set_phase(a, "ACTIVE")
    tokens += [run(a, [5], 6), run(b, [7], 4)]    # b comes back by a reactive restore, pushing a out
    engine.stop()
    engine.join()
    engine.arena.close()
    return engine.metrics.counters, tokens


def test_prefetch_into_an_idle_sessions_blocks_matches_a_never_swapped_run_on_cuda():
    _, reference = tool_call_under_pressure("none", 64.0)
    counters, tokens = tool_call_under_pressure("semantic", 0.125)
    assert counters["swaps_out_prefetch_room"] == 1 and counters["swaps_in_prefetch"] == 1
    assert counters["swaps_in_restore"] == 1
    assert tokens == reference


def test_agents_one_request_at_a_time_get_unpaged_tokens_in_fp16_on_cuda():
    """Every batch holds one request in both runs, so only paging can change a token: prefetches
    that evict for room overlap other agents' compute on the side streams."""
    from experiments.check_paging_exact import history_tokens, pool_mib, run_agents
    shape = dict(agents=6, turns=3, context=96, growth=16, new_tokens=8, tool_s=0.02)
    tokens = history_tokens(3, 96, 16, 8)
    everyone = pool_mib("random:tiny", "cuda", "float16", tokens, 6)
    reference, _ = run_agents("random:tiny", "cuda", "float16", "none", everyone, 0, **shape)
    paged, counters = run_agents("random:tiny", "cuda", "float16", "semantic",
                                 pool_mib("random:tiny", "cuda", "float16", tokens, 2), everyone, **shape)
    assert counters["swaps_in_prefetch"] > 0 and counters["swaps_out_prefetch_room"] > 0
    assert paged == reference
