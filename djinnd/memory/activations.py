"""Activation segments: hidden states of a paused forward, in POSIX shared memory the client maps.

One segment per pause, named for this daemon with an unguessable suffix and created exclusively,
readable and writable by the daemon's uid only, unlinked when the forward resumes. The daemon
never maps a segment: it writes and reads through a file descriptor (pwrite/preadv), so a client
that shrinks or replaces the segment gets an error for its own request, never a SIGBUS here.
"""
import os
import secrets

import posix_ipc
import torch

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class SegmentError(ValueError):
    pass


class ActivationSegment:
    def __init__(self, shape: tuple, dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = max(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(), 1)
        self.name = f"/djinn-{os.getpid()}-act-{secrets.token_hex(12)}"
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600)
        try:
            os.posix_fallocate(shm.fd, 0, self.nbytes)   # tmpfs full: an error now, not a SIGBUS later
        except OSError as e:
            self.close()
            raise MemoryError(f"/dev/shm cannot hold {self.nbytes} bytes of activations: {e}") from None
        finally:
            shm.close_fd()

    def descriptor(self) -> dict:
        return {"segment": self.name, "offset": 0, "shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype]}

    def write(self, hidden: torch.Tensor):
        data = hidden.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        with _opened(self.name) as fd:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)

    def read(self) -> torch.Tensor:
        """The (maybe edited) hidden states, copied out; SegmentError if the client broke the segment."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        view, done = buf.numpy(), 0
        try:
            with _opened(self.name) as fd:
                while done < self.nbytes:
                    n = os.preadv(fd, [view[done:]], done)
                    if n == 0:
                        break
                    done += n
        except (posix_ipc.ExistentialError, OSError) as e:
            raise SegmentError(f"activation segment {self.name} cannot be read: {e}") from None
        if done < self.nbytes:
            raise SegmentError(f"activation segment {self.name} holds {done} of {self.nbytes} bytes: "
                               "it was truncated")
        return buf.view(self.dtype).view(self.shape)

    def close(self):
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


class _opened:
    def __init__(self, name: str):
        self.shm = posix_ipc.SharedMemory(name)

    def __enter__(self) -> int:
        return self.shm.fd

    def __exit__(self, *exc):
        self.shm.close_fd()
