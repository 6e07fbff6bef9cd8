"""Activation segments: hidden states of a paused forward (or logits), in shared memory the client maps.

Sealed segments (share "edit" or "read") are memfds that have no name: the client gets the file
descriptor beside the reply (SCM_RIGHTS), and seals stop anyone from shrinking or growing them
("read": from writing them too, once the daemon wrote them). Named segments ("name", for callers
that hand out a name) live in /dev/shm, unguessable and 0600, unlinked when done. The daemon never
maps a segment: it writes and reads through a file descriptor (pwrite/preadv), so no client can
make it SIGBUS.
"""
import contextlib
import fcntl
import os
import secrets
from collections import Counter

import posix_ipc
import torch

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class SegmentError(ValueError):
    pass


class QuotaExceeded(Exception):
    pass


class SegmentQuota:
    """Bytes of segments each connection (owner) and each uid holds; a segment past either cap is
    refused, so no client, nor one user's many connections, can fill /dev/shm."""

    def __init__(self, per_client: int, per_uid: int):
        self.per_client, self.per_uid = per_client, per_uid
        self.by_owner: Counter = Counter()
        self.by_uid: Counter = Counter()
        self.uid_of: dict[int, int] = {}          # owner -> its peer's uid, told by the engine

    def require(self, owner: int, nbytes: int):
        """QuotaExceeded unless `owner` may hold nbytes more."""
        uid = self.uid_of.get(owner)
        for held, cap, who, key in ((self.by_owner[owner], self.per_client, "this connection", "client"),
                                    (self.by_uid[uid], self.per_uid, f"uid {uid}", "uid")):
            if held + nbytes > cap:
                raise QuotaExceeded(f"{who} holds {held / 2**20:.1f} MiB of shared-memory segments; "
                                    f"{nbytes / 2**20:.1f} MiB more would pass the cap of {cap / 2**20:.0f} MiB "
                                    f"(server.max_segment_mb_per_{key}); resume, read or release what it holds")

    def charge(self, owner: int, nbytes: int):
        self.require(owner, nbytes)
        self.by_owner[owner] += nbytes
        self.by_uid[self.uid_of.get(owner)] += nbytes

    def release(self, owner: int, nbytes: int):
        self.by_owner[owner] -= nbytes
        self.by_uid[self.uid_of.get(owner)] -= nbytes


class ActivationSegment:
    def __init__(self, shape: tuple, dtype, quota: SegmentQuota | None = None, owner: int | None = None,
                 share: str = "name"):
        """quota, owner: charge the segment to this connection (QuotaExceeded past its caps). share:
        "edit" (sealed, the client may write), "read" (sealed, read-only once written) or "name"."""
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = max(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(), 1)
        self.charged = None
        if quota is not None:
            quota.charge(owner, self.nbytes)
            self.charged = (quota, owner)
        self.share, self.fd = share, None
        if share == "name":
            self.name = f"/djinn-{os.getpid()}-act-{secrets.token_hex(12)}"
            shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600)
            fd = shm.fd
        else:
            self.name = f"memfd:djinn-act-{secrets.token_hex(4)}"
            fd = self.fd = os.memfd_create(self.name[6:], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.posix_fallocate(fd, 0, self.nbytes)   # tmpfs full: an error now, not a SIGBUS later
        except OSError as e:
            self.close()
            raise MemoryError(f"shared memory cannot hold {self.nbytes} bytes of activations: {e}") from None
        finally:
            if share == "name":
                shm.close_fd()
        if self.fd is not None:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SIZE_SEALS | (fcntl.F_SEAL_SEAL if share == "edit" else 0))

    def descriptor(self) -> dict:
        """What the client maps; a sealed segment's "fd" is a duplicate the server sends and closes."""
        desc = {"segment": self.name, "offset": 0, "shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype]}
        if self.fd is not None:
            desc |= {"fd": os.dup(self.fd), "writable": self.share == "edit"}
        return desc

    def write(self, hidden: torch.Tensor):
        data = hidden.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        with self._opened() as fd:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
        if self.share == "read":               # nobody writes it after us
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)

    def _opened(self):
        return contextlib.nullcontext(self.fd) if self.fd is not None else _opened(self.name)

    def read(self) -> torch.Tensor:
        """The (maybe edited) hidden states, copied out; SegmentError if the client broke the segment."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        view, done = buf.numpy(), 0
        try:
            with self._opened() as fd:
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
        if self.charged:
            quota, owner = self.charged
            quota.release(owner, self.nbytes)
            self.charged = None
        if self.fd is not None:
            os.close(self.fd)                  # the clients' copies keep the memory while they map it
            self.fd = None
            return
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


class SegmentTable(dict):
    """Each key's (a connection's or a session's) latest segment; putting a new one, releasing the key
    or closing the table unlinks what it replaces."""

    def put(self, key: int, segment: "ActivationSegment"):
        self.release(key)
        self[key] = segment

    def release(self, key: int):
        segment = self.pop(key, None)
        if segment is not None:
            segment.close()

    def close(self):
        for key in list(self):
            self.release(key)


class _opened:
    def __init__(self, name: str):
        self.shm = posix_ipc.SharedMemory(name)

    def __enter__(self) -> int:
        return self.shm.fd

    def __exit__(self, *exc):
        self.shm.close_fd()
