"""On CUDA: the step clock charges a step the GPU's time for its own work, also when it is launched
while the GPU still runs the step before (the host runs a step ahead), and never waits for it."""
import time

import pytest
import torch

from djinnd.engine.step_clock import StepClock

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def test_a_step_launched_behind_busy_work_is_charged_its_own_gpu_time_once_done():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)

    def work():
        for _ in range(50):
            x @ x

    work()
    torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    torch.cuda.synchronize()
    alone_s = time.perf_counter() - started
    clock, reported = StepClock("cuda"), []
    torch.cuda._sleep(200_000_000)          # the step before, still on the GPU (about 0.1 s)
    start = clock.mark()
    work()
    clock.span(start, clock.mark(), reported.append)
    clock.poll()
    assert reported == []                   # not done yet, and polling did not wait for it
    torch.cuda.synchronize()
    clock.poll()
    assert len(reported) == 1 and 0.5 * alone_s <= reported[0] <= 2 * alone_s, (reported, alone_s)
