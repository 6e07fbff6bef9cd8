"""StepClock: how long the device took for a step's forwards, for the step budget. On CUDA the host
runs a step ahead of the GPU (it launches a step, then waits for the one before), so its own clock
times launches and waits, not work; CUDA events around the forwards time the GPU's, read once the
GPU has passed them (a later step: no sync in the hot path). On CPU the forwards are synchronous and
perf_counter times them."""
import time
from collections import deque

import torch

MAX_PENDING = 64     # spans not read yet: bounded, should steps ever stop being polled


class StepClock:
    def __init__(self, device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.pending: deque = deque(maxlen=MAX_PENDING)   # (start, end, report): end not reached yet

    def mark(self):
        """A point in the stream of device work: an event recorded now on CUDA, the time on CPU."""
        if not self.is_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def span(self, start, end, report):
        """report(seconds) of the work between two marks, once the device has done it (see poll)."""
        self.pending.append((start, end, report))
        if not self.is_cuda:
            self.poll()

    def poll(self):
        """Report the spans the device has finished, oldest first."""
        while self.pending and (not self.is_cuda or self.pending[0][1].query()):
            start, end, report = self.pending.popleft()
            report(end - start if not self.is_cuda else start.elapsed_time(end) / 1e3)
