"""Mixed steps (mixed_steps: true): a step that decodes and feeds prompt chunks runs one forward,
and gives the tokens of the two-forward path (fp32, torch path on CPU), greedy and seeded sampling."""
import pytest

from conftest import decode_while_prompts_arrive, random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.session import SamplingParams


def run(overrides: dict, params: SamplingParams):
    """Three sessions decoding while two prompts (300 and 90 tokens) arrive, in 64-token chunks."""
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "dtype": "float32",
                                             "kv_cache_mb": 16.0, "max_num_batched_tokens": 64, **overrides}))
    engine.start()
    client = LocalClient(engine)
    outs = decode_while_prompts_arrive(client, random_prompts(512, [5, 9, 7], seed=3),
                                       random_prompts(512, [300, 90], seed=4), params)
    engine.stop()
    engine.join()
    return outs, engine.metrics.counters.get("mixed_steps", 0)


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=40, ignore_eos=True),
                                    SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8, top_p=0.9,
                                                   seed=11)])
def test_mixed_steps_give_the_tokens_of_two_forwards(params):
    plain, no_mixed = run({}, params)
    mixed, num_mixed = run({"mixed_steps": True}, params)
    assert no_mixed == 0 and num_mixed > 0
    assert mixed == plain
