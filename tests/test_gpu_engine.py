"""On CUDA: the engine's tokens equal HF transformers' on the same device and weights."""
import pytest
import torch

from conftest import hf_greedy, hf_reference, random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def test_batched_tokens_match_hf_on_cuda():
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 64.0}))
    engine.start()
    client = LocalClient(engine)
    prompts = random_prompts(engine.loaded.model.args.vocab_size, [5, 33, 70, 12], seed=3)
    pending = [client.submit(client.open(), p, 20) for p in prompts]
    outs = [client.done(e)[0].tokens for e in pending]
    engine.stop()
    hf = hf_reference(engine.loaded.model).cuda()
    for prompt, out in zip(prompts, outs):
        assert out == hf_greedy(hf, prompt, 20)
