"""SegmentWriter: rows of a forward written into a shared-memory segment behind the device. Each
piece of rows is copied, in stream order, into one of a few reused staging buffers (pinned on CUDA)
and a worker thread waits for that copy and pwrites the bytes (os.pwrite releases the GIL), so the
copies and writes of one sub-batch overlap the forward of the next. The worker runs its jobs in
order; its first error stops the writing and reaches the caller at the next piece or at finish().
On CPU the copy is done at once and only the pwrite is behind: the same code, no events.
"""
import os
import queue
import threading

import posix_ipc
import torch

from djinnd.engine.interventions import pwrite_all


def staging_buffers(count: int, nbytes: int, device) -> list[torch.Tensor]:
    """Made once and reused: pinned memory is slow to allocate."""
    pin = torch.device(device).type == "cuda"
    return [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]


class SegmentWriter:
    def __init__(self, buffers: list[torch.Tensor], device, make_segment):
        """make_segment() -> ActivationSegment, called first on the worker (creating the segment
        overlaps the first forward); finish() hands it out, close() after a failure unlinks it."""
        self.is_cuda = torch.device(device).type == "cuda"
        self.piece = buffers[0].numel()
        self.free: queue.Queue = queue.Queue()
        for b in buffers:
            self.free.put(b)
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.segment, self.fd = None, None
        self.jobs.put((lambda: self._open(make_segment), None))
        self.thread = threading.Thread(target=self._work, name="djinn-harvest-writer", daemon=True)
        self.thread.start()

    def write(self, rows: torch.Tensor, offset: int):
        """Bytes of rows (on the device; changed in place later in stream order) at `offset`."""
        data = rows.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, data.numel(), self.piece):
            buffer = self.free.get()
            if self.error is not None:
                self.free.put(buffer)
                raise self.error
            n = min(self.piece, data.numel() - start)
            buffer[:n].copy_(data[start:start + n], non_blocking=True)
            done = torch.cuda.Event() if self.is_cuda else None
            if done is not None:
                done.record()
            self.jobs.put((lambda b=buffer, n=n, at=offset + start, e=done: self._pwrite(b, n, at, e), buffer))

    def finish(self):
        """Wait for every write; the segment, now the caller's, or the worker's error raised."""
        self._stop()
        if self.error is not None:
            raise self.error
        self._close_fd()
        segment, self.segment = self.segment, None
        return segment

    def close(self):
        """Stop the worker; a segment finish() did not hand out is closed (never half-written)."""
        self._stop()
        self._close_fd()
        if self.segment is not None:
            self.segment.close()
            self.segment = None

    def _close_fd(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _stop(self):
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def _open(self, make_segment):
        self.segment = make_segment()
        self.fd = posix_ipc.SharedMemory(self.segment.name).fd

    def _pwrite(self, buffer, n: int, offset: int, done):
        if done is not None:
            done.synchronize()
        pwrite_all(self.fd, buffer[:n].numpy(), offset)

    def _work(self):
        while (job := self.jobs.get()) is not None:
            fn, buffer = job
            try:
                if self.error is None:
                    fn()
            except BaseException as e:          # kept for the caller; later jobs only give buffers back
                self.error = e
            finally:
                if buffer is not None:
                    self.free.put(buffer)
