"""On CUDA: a forward paused and resumed through shared memory gives the unpaused tokens."""
import pytest
import torch

import libdjinn
from conftest import random_prompts, start_daemon, stop_daemon

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def test_pauses_on_cuda_match_an_unpaused_run(tmp_path):
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--device", "cuda", "--dtype", "float32")
    try:
        [prompt] = random_prompts(512, [40], seed=23)
        with libdjinn.connect(daemon.socket) as djinn:
            plain = djinn.session().generate(prompt_ids=prompt, max_new_tokens=10, ignore_eos=True).tokens
            trace = djinn.session().trace(prompt_ids=prompt, max_new_tokens=10, ignore_eos=True,
                                          breakpoints=[0, 3], steps="all")
            pauses = sum(1 for _ in trace)
            edited = djinn.session().generate(prompt_ids=prompt, max_new_tokens=10, ignore_eos=True,
                                              hooks={1: lambda bp: bp.hidden.mul_(-1.0)})
        assert pauses == 20 and trace.result.tokens == plain and edited.tokens != plain
    finally:
        stop_daemon(daemon)
