"""On CUDA: mixed steps replayed from CUDA graphs (engine/mixed_graphs.py) give the tokens of the
same steps run eagerly (fp32, Llama-3.2-1B shapes, random weights): three sessions decode while
prompts of 600 and 90 tokens arrive in chunks of up to 128 tokens over their growing prefixes, so
replays pad decode rows and chunk tokens to their buckets and split the keys of short chunks."""
import pytest
import torch

from conftest import random_prompts
from djinnd.session import SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def run(cuda_graphs: bool):
    from djinnd.config import load_config
    from djinnd.daemon import build_engine
    from djinnd.engine.local import LocalClient
    engine = build_engine(load_config(None, {"model": "random:llama-3.2-1b", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 1024, "max_num_seqs": 8, "max_num_batched_tokens": 128,
                                             "mixed_steps": True, "cuda_graphs": cuda_graphs}))
    engine.start()
    client, params = LocalClient(engine), SamplingParams(max_new_tokens=48, ignore_eos=True)
    short, late = random_prompts(1000, [5, 9, 7], seed=3), random_prompts(1000, [600, 90], seed=4)
    pending = [client.submit(client.open(), p, params=params) for p in short]
    pending[0].put(pending[0].get(timeout=120))                # decoding has started
    pending += [client.submit(client.open(), p, params=params) for p in late]
    outs = [client.done(e)[0].tokens for e in pending]
    replays = engine.runner.mixed_graphs.replays if engine.runner.mixed_graphs else 0
    engine.stop()
    engine.join()
    return outs, replays, engine.metrics.counters.get("mixed_steps", 0)


def test_replayed_mixed_steps_give_the_tokens_of_eager_ones():
    eager, no_replays, eager_mixed = run(cuda_graphs=False)
    graphed, replays, graphed_mixed = run(cuda_graphs=True)
    assert no_replays == 0 and eager_mixed > 0
    assert replays > 0 and replays == graphed_mixed
    assert graphed == eager
