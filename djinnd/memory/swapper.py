"""Swapper: copies a session's KV blocks device -> host arena and back on side streams.

On CUDA each direction has its own stream; a copy waits for the compute stream's earlier work
with an event, is timed with events, and the compute stream waits only for swap-ins it is about
to use. On CPU the same code runs with plain, synchronous copies. Blocks a copy reads are freed
only once `poll()` sees it finished.
"""
import contextlib
import time
from dataclasses import dataclass, field

import torch

from djinnd.metrics import SwapRecord


def _bytes(t):
    """An fp8 pool moves as bytes (torch has no fp8 index kernels); its host arena holds bytes."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


@dataclass
class Transfer:
    session: int
    direction: str                 # "out" or "in"
    cause: str
    nbytes: int
    free_device: list = field(default_factory=list)   # device blocks to free once the copy is done
    free_host: list = field(default_factory=list)     # host runs to free once the copy is done
    started: float = field(default_factory=time.perf_counter)
    events: tuple = ()             # (start, end) CUDA events
    staged: object = None          # keeps the staging buffer alive until the copy is done
    ms: float | None = None

    def done(self) -> bool:
        return not self.events or self.events[1].query()


class Swapper:
    def __init__(self, pool, arena, device, metrics):
        self.pool, self.arena, self.metrics = pool, arena, metrics
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.streams = {d: torch.cuda.Stream(self.device) for d in ("out", "in")} if self.is_cuda else {}
        self.in_flight: list[Transfer] = []
        self.mirror = getattr(pool, "mirror", None)     # tensor parallelism: each rank copies its heads too

    def swap_out(self, session: int, device_blocks: list[int], host_runs: list, cause: str) -> Transfer:
        if self.mirror is not None:
            self.mirror.swap_out(session, device_blocks, host_runs)
        t = Transfer(session, "out", cause, len(device_blocks) * self.arena.block_bytes)
        with self._on_stream("out", t):
            idx = self._index(device_blocks)
            staged = torch.stack((_bytes(self.pool.k).index_select(1, idx), _bytes(self.pool.v).index_select(1, idx)),
                                 dim=1)
            staged = staged.transpose(0, 2).contiguous()     # [L, 2, n, ...] -> [n, 2, L, ...], a host block each
            offset = 0
            for start, length in self.arena.pieces(host_runs):
                self.arena.blocks[start:start + length].copy_(staged[offset:offset + length], non_blocking=True)
                offset += length
            t.staged = staged
        return t

    def swap_in(self, session: int, host_runs: list, device_blocks: list[int], cause: str, after=()) -> Transfer:
        """after: transfers (a swap-out of the same KV) this copy must follow."""
        if self.mirror is not None:
            self.mirror.swap_in(session, host_runs, device_blocks)
        t = Transfer(session, "in", cause, len(device_blocks) * self.arena.block_bytes)
        with self._on_stream("in", t, after):
            parts = [self.arena.blocks[s:s + n].to(self.device, non_blocking=True)
                     for s, n in self.arena.pieces(host_runs)]
            staged = torch.cat(parts) if len(parts) > 1 else parts[0]          # [n, 2, L, ...]
            idx = self._index(device_blocks)
            _bytes(self.pool.k).index_copy_(1, idx, staged[:, 0].transpose(0, 1))
            _bytes(self.pool.v).index_copy_(1, idx, staged[:, 1].transpose(0, 1))
            t.staged = staged
        return t

    def _index(self, blocks: list[int]):
        """Block ids on the device. From pinned memory, so the host does not wait for the side
        stream's earlier copies, as a pageable copy would."""
        idx = torch.tensor(blocks, dtype=torch.long)
        return idx.pin_memory().to(self.device, non_blocking=True) if self.is_cuda else idx

    @contextlib.contextmanager
    def _on_stream(self, direction: str, t: Transfer, after=()):
        if not self.is_cuda:
            yield
            t.ms = (time.perf_counter() - t.started) * 1e3
            self.in_flight.append(t)
            return
        stream = self.streams[direction]
        stream.wait_stream(torch.cuda.current_stream(self.device))   # KV the compute stream wrote
        for other in after:
            if other.events:
                stream.wait_event(other.events[1])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            yield
            end.record()
        t.events = (start, end)
        self.in_flight.append(t)

    def wait_before_compute(self, transfers):
        """The compute stream waits for these swap-ins; the host does not."""
        if self.is_cuda:
            for t in transfers:
                if t.events:
                    torch.cuda.current_stream(self.device).wait_event(t.events[1])

    def poll(self) -> list[Transfer]:
        """Transfers that have finished since the last poll, timed and recorded."""
        done = [t for t in self.in_flight if t.done()]
        self.in_flight = [t for t in self.in_flight if t not in done]
        for t in done:
            if t.events:
                t.ms = t.events[0].elapsed_time(t.events[1])
            t.staged = None
            self.metrics.record_swap(SwapRecord(time.time(), t.session, t.direction, t.nbytes, t.ms, t.cause))
        return done
