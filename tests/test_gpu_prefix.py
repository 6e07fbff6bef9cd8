"""On CUDA: sessions sharing a prefix, with paging to the pinned host arena, give the tokens of the
same calls on an engine with sharing off, one request at a time (identical batches otherwise)."""
import pytest
import torch

from conftest import random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def agents_sharing_a_prefix(sharing: str, policy: str, dtype: str):
    """8 sessions: prefix + own suffix, a tool call (IO_WAIT), a second turn. Tokens and status."""
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": dtype,
                                             "kv_cache_mb": 0.25, "host_arena_mb": 8.0, "policy": policy,
                                             "prefix_sharing": sharing}))
    engine.arena.wait_pinned()
    engine.start()
    client = LocalClient(engine)
    vocab = engine.loaded.model.args.vocab_size
    [prefix] = random_prompts(vocab, [64], seed=5)
    ends = random_prompts(vocab, [3 + i for i in range(8)], seed=6)
    sessions = [client.open() for _ in ends]
    firsts = []
    for s, e in zip(sessions, ends):
        firsts.append(client.done(client.submit(s, prefix + e, 12))[0].tokens)
        client.set_phase(s, "IO_WAIT", expected_s=5.0)
    seconds = [client.done(client.submit(s, [7, 8], 8))[0].tokens for s in sessions]
    status = engine.pager.prefix.status()
    swaps = engine.metrics.counters.get("swaps_out", 0)
    engine.stop()
    engine.join()
    engine.arena.close()
    return firsts, seconds, status, swaps


@pytest.mark.parametrize("policy", ["semantic", "lru", "recompute"])
def test_shared_prefix_tokens_equal_sharing_off_on_cuda(policy):
    ref = agents_sharing_a_prefix("off", policy, "float32")
    firsts, seconds, status, swaps = agents_sharing_a_prefix("user", policy, "float32")
    assert (firsts, seconds) == ref[:2]
    assert status["hit_tokens"] >= 64 * 4
    assert swaps > 0 or policy == "recompute"
