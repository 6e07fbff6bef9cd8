"""Activation segments: hidden states of a paused forward, in POSIX shared memory the client maps.

One segment per pause, named for this daemon (so the stale sweep at start finds it after a
crash), readable and writable by the daemon's uid only, unlinked when the forward resumes.
"""
import itertools
import mmap
import os

import posix_ipc
import torch

_serial = itertools.count()
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ActivationSegment:
    def __init__(self, shape: tuple, dtype):
        self.shape, self.dtype = tuple(shape), dtype
        nbytes = max(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(), 1)
        self.name = f"/djinn-{os.getpid()}-act{next(_serial)}"
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600, size=nbytes)
        self._map = mmap.mmap(shm.fd, nbytes)
        shm.close_fd()
        self.tensor = torch.frombuffer(self._map, dtype=dtype, count=torch.Size(shape).numel()).view(self.shape)

    def descriptor(self) -> dict:
        return {"segment": self.name, "offset": 0, "shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype]}

    def close(self):
        # No mmap.close(): torch views do not pin the mapping, and unmapping under a live view
        # would crash. Dropping our references lets it go with the last view.
        del self.tensor, self._map
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass
