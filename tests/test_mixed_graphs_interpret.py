"""MixedGraphs' static forward (engine/mixed_graphs.py) on CPU: the paged kernels run under
Triton's interpreter, and each "graph" runs the bucket's static forward eagerly where CUDA would
replay it (CUDA graphs cannot exist here; tests/test_gpu_mixed_graphs.py replays real ones). Two
sessions decode while prompts of 200 and 90 tokens arrive in chunks of up to 128 tokens: the
tokens equal those of eager mixed steps with the same kernels, and every mixed step went through
the static buffers (padded decode rows and chunk tokens, padding tiles on the empty session)."""
from conftest import require_triton_interpreter, run_interpreted

require_triton_interpreter("tests/test_gpu_mixed_graphs.py replays the real graphs")

CHILD = """
import json, sys
sys.path.insert(0, "tests")
from conftest import decode_while_prompts_arrive, random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.engine.mixed_graphs import MixedGraphs
from djinnd.model import triton_attention, triton_prefill
from djinnd.session import SamplingParams


class EagerReplay:
    def __init__(self, graphs, key):
        self.graphs, self.key = graphs, key

    def replay(self):
        self.graphs.outputs[self.key] = self.graphs.forward(*self.key)


def prefill_kernel(q, k_cache, v_cache, meta):
    if meta.tiles is None:
        meta.tiles = triton_prefill.plan(meta.query_lens, meta.context_lens, q.shape[1] // k_cache.shape[2],
                                         k_cache.shape[2], q.element_size(), q.device, num_sms=4)
    return triton_prefill.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.tiles)


def run(static: bool):
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "dtype": "float32",
                                             "kv_cache_mb": 1.0, "max_num_batched_tokens": 128, "max_num_seqs": 4,
                                             "mixed_steps": True}))
    runner = engine.runner
    runner.decoder.kernel = lambda q, kc, vc, tables, lens: triton_attention.paged_decode_attention(
        q, kc, vc, tables, lens, 1, 32)
    runner.decoder.prefill_kernel = prefill_kernel
    if static:
        graphs = runner.mixed_graphs = MixedGraphs(runner.decoder, 128, num_sms=4)
        graphs.graphs = {(r, t): EagerReplay(graphs, (r, t)) for r in graphs.row_sizes for t in graphs.token_sizes}
    engine.start()
    client = LocalClient(engine)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    outs = decode_while_prompts_arrive(client, random_prompts(512, [5, 7], seed=3),
                                       random_prompts(512, [200, 90], seed=4), params)
    engine.stop()
    engine.join()
    return outs, runner.mixed_graphs.replays if static else 0, engine.metrics.counters.get("mixed_steps", 0)


print(json.dumps([run(False), run(True)]))
"""


def test_static_mixed_forward_gives_the_tokens_of_eager_mixed_steps():
    (eager, _, eager_mixed), (static, replays, static_mixed) = run_interpreted(CHILD, timeout=600)
    assert eager_mixed > 0 and replays == static_mixed > 0
    assert static == eager
