"""On CUDA with graphs: steering and capture replay inside the decode graphs (their own variants) and
give the breakpoint reference's tokens and hidden states; unsteered rows of the same batch keep
their plain tokens."""
import threading

import pytest
import torch

import libdjinn
from conftest import random_prompts, start_daemon, stop_daemon

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

GEN = dict(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def cuda_daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("gpu-iv"), "--model", "random:tiny", "--device", "cuda",
                     "--dtype", "float32", "--kv-cache-mb", "64")
    yield d
    stop_daemon(d)


def test_graph_steering_and_capture_equal_the_breakpoint_reference(cuda_daemon):
    prompts = random_prompts(512, [9, 16, 5, 12], seed=61)   # < 17: no full block to share
    vectors = [torch.randn(64, generator=torch.Generator().manual_seed(i)) * 3 for i in range(4)]
    with libdjinn.connect(cuda_daemon.socket) as djinn:
        assert djinn.status()["engine"]["cuda_graphs"]
        plain = [djinn.session().generate(prompt_ids=p, **GEN).tokens for p in prompts]
        reference = [djinn.session().generate(prompt_ids=p, hooks={2: lambda bp, v=v: bp.hidden.add_(v)},
                                              **GEN).tokens for p, v in zip(prompts, vectors)]
        hidden = []
        for p, v in zip(prompts, vectors):
            rows = []
            for bp in djinn.session().trace(prompt_ids=p, breakpoints=[2, 3], steps="all", **GEN):
                if bp.layer == 2:
                    bp.hidden.add_(v)
                else:
                    rows.append(bp.hidden.clone())
            hidden.append(torch.cat(rows))
        out = [None] * 4

        def agent(i):      # rows 0 and 2 steer and capture, 1 and 3 do not: one batch, mixed
            with libdjinn.connect(cuda_daemon.socket) as own:
                kw = dict(steer={2: vectors[i]}, capture=[3]) if i % 2 == 0 else {}
                out[i] = own.session().generate(prompt_ids=prompts[i], **kw, **GEN)
        threads = [threading.Thread(target=agent, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i in range(4):
        assert out[i].tokens == (reference[i] if i % 2 == 0 else plain[i])
    for i in (0, 2):
        torch.testing.assert_close(out[i].activations[3], hidden[i], rtol=1e-4, atol=1e-4)
