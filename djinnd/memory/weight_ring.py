"""WeightRing: the device slots that streamed layers pass through, filled from host memory by a
copy stream that runs ahead of compute.

Skip-end layout: slots are laid out from offset 0, one layer's region each (offsets computed once,
views made once per slot); a layer never wraps past the end, so a tail too small for a whole layer
is skipped rather than split:

    |slot 0|slot 1| ... |slot n-1|skipped|
    0                                     ring_bytes

Ordering on CUDA, for slot k (events, never a host sync):
    copy stream:    wait free[k] -> copy the layer from host -> record ready[k]
    compute stream: wait ready[k] (only if it has not arrived) -> the layer -> record free[k]
On CPU the copies are plain synchronous copies through the same slots.
"""
import collections
import time

import torch

from djinnd.memory.host_weights import layer_layout, tensor_views


def skip_end_offsets(layer_bytes: int, ring_bytes: int) -> list[int]:
    """Where each slot starts: consecutive layers from 0; the tail that cannot hold one is skipped."""
    return [k * layer_bytes for k in range(ring_bytes // layer_bytes)]


class WeightRing:
    def __init__(self, shapes: dict, dtype, device, ring_bytes: int, chunk_bytes: int = 0):
        """Slots for layers holding tensors of `shapes`; copies go in pieces of at most chunk_bytes
        (0: one copy per layer)."""
        self.shapes, self.dtype, self.device = shapes, dtype, torch.device(device)
        self.offsets, self.layer_bytes = layer_layout(shapes, dtype)
        self.ring_bytes, self.chunk_bytes = ring_bytes, chunk_bytes
        self.slot_offsets = skip_end_offsets(self.layer_bytes, ring_bytes)
        assert self.slot_offsets, f"a ring of {ring_bytes} bytes cannot hold one {self.layer_bytes}-byte layer"
        self.buffer = torch.empty(ring_bytes, dtype=torch.uint8, device=self.device)
        self.flat = [self.buffer[o:o + self.layer_bytes] for o in self.slot_offsets]
        self.views = [tensor_views(f, shapes, self.offsets, dtype) for f in self.flat]
        self.is_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.ready = [None] * self.num_slots          # recorded on the copy stream after each load
        self.free = [torch.cuda.Event() if self.is_cuda else None for _ in self.slot_offsets]
        self.bytes_copied, self.copy_seconds, self.num_loads, self.num_waits = 0, 0.0, 0, 0
        self._timing = collections.deque()            # (start, end, bytes) of loads not yet timed

    @property
    def num_slots(self) -> int:
        return len(self.slot_offsets)

    def load(self, slot: int, src: torch.Tensor):
        """Copy one layer's flat host region into `slot`, after compute on its last occupant is done."""
        if not self.is_cuda:
            started = time.perf_counter()
            self._copy(self.flat[slot], src)
            self.copy_seconds += time.perf_counter() - started
            self.bytes_copied += self.layer_bytes
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                start.record()
                self._copy(self.flat[slot], src)
                end.record()
            self.ready[slot] = end
            self._timing.append((start, end, self.layer_bytes))
            self._harvest()
        self.num_loads += 1

    def _copy(self, dst: torch.Tensor, src: torch.Tensor):
        step = self.chunk_bytes or self.layer_bytes
        for i in range(0, self.layer_bytes, step):
            dst[i:i + step].copy_(src[i:i + step], non_blocking=True)

    def wait(self, slot: int):
        """The compute stream waits for slot's load, only if it has not already arrived."""
        ready = self.ready[slot]
        if ready is not None and not ready.query():
            torch.cuda.current_stream(self.device).wait_event(ready)
            self.num_waits += 1

    def release(self, slot: int):
        """Compute on slot's layer has been queued: the next load into it waits for that."""
        if self.is_cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))

    def _harvest(self):
        """Time the loads that have finished (event queries only; never blocks)."""
        while self._timing and self._timing[0][1].query():
            start, end, nbytes = self._timing.popleft()
            self.copy_seconds += start.elapsed_time(end) / 1e3
            self.bytes_copied += nbytes

    def stats(self) -> dict:
        if self.is_cuda:
            self._harvest()
        return {"ring_bytes": self.ring_bytes, "ring_slots": self.num_slots, "layer_bytes": self.layer_bytes,
                "chunk_bytes": self.chunk_bytes, "loads": self.num_loads, "compute_waits": self.num_waits,
                "bytes_streamed": self.bytes_copied, "copy_s": round(self.copy_seconds, 6),
                "copy_gb_per_s": round(self.bytes_copied / self.copy_seconds / 1e9, 3) if self.copy_seconds else None}
