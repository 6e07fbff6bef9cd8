"""On CUDA: the weights are one flat device buffer (CUDA graphs still captured, tokens still HF's),
another process attaches it through one IPC handle without allocating a copy, and hf_model() gives
the daemon's own logits on the same device."""
import pytest
import torch

import libdjinn
from conftest import hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.model.flat_weights import FlatWeights

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.fixture(scope="module")
def cuda_daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("gpuw"), "--model", "random:tiny", "--device", "cuda",
                     "--dtype", "float32", "--kv-cache-mb", "16", "--host-arena-mb", "16")
    yield d
    stop_daemon(d)


def test_packed_weights_keep_cuda_graphs_and_hf_tokens():
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 64.0}))
    flat = engine.loaded.flat_weights
    assert isinstance(flat, FlatWeights) and flat.handle()["kind"] == "cuda_ipc"
    base = flat.buffer.data_ptr()
    assert all(base <= p.data_ptr() < base + flat.nbytes for p in engine.loaded.model.parameters())
    assert engine.runner.decoder.graphs, "decode graphs captured over the packed weights"
    engine.start()
    client = LocalClient(engine)
    prompts = random_prompts(engine.loaded.model.args.vocab_size, [7, 30], seed=4)
    outs = [client.done(e)[0].tokens for e in [client.submit(client.open(), p, 16) for p in prompts]]
    engine.stop()
    hf = hf_reference(engine.loaded.model).cuda()
    assert outs == [hf_greedy(hf, p, 16) for p in prompts]


def test_attach_through_cuda_ipc_allocates_no_copy_and_matches_the_daemon(cuda_daemon):
    ids = torch.tensor(random_prompts(512, [21, 21], seed=5))
    torch.cuda.init()
    before = torch.cuda.memory_allocated()
    with libdjinn.connect(cuda_daemon.socket) as djinn:
        w = djinn.attach_weights()
        hf = djinn.hf_model()
        assert w.kind == "cuda_ipc" and all(t.is_cuda for t in w.values())
        assert next(hf.parameters()).data_ptr() in {t.data_ptr() for t in w.values()}
        assert torch.cuda.memory_allocated() - before < w.nbytes // 10   # only rotary buffers are ours
        rows = djinn.status()["weights_export"]["attachments"]
        assert [a["bytes_mapped"] for a in rows] == [w.nbytes]      # one row per connection
        with torch.no_grad():
            mine = hf(ids.cuda()).logits.cpu()
        theirs = libdjinn.GhostModel(djinn)(ids).logits
        greedy = libdjinn.GhostModel(djinn).generate(ids, max_new_tokens=8, min_new_tokens=8)
        with torch.no_grad():
            hf_greedy_ids = hf.generate(ids.cuda(), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                        attention_mask=torch.ones_like(ids).cuda()).cpu()
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy, hf_greedy_ids)
    with libdjinn.connect(cuda_daemon.socket) as djinn:      # the closed connections detached
        assert djinn.status()["weights_export"]["attachments"] == []
