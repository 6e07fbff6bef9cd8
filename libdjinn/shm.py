"""Map a tensor descriptor (segment, offset, shape, dtype) from djinnd into this process: a sealed
segment by the file descriptor that came beside the reply (its size cannot change under us), else by
its /dev/shm name. numpy views always; torch views when torch is installed. Never initializes CUDA."""
import mmap
import os
import warnings

import numpy as np
import posix_ipc

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class MappedTensor:
    """A zero-copy view of a daemon-owned segment; valid until the pause it belongs to resumes."""

    def __init__(self, desc: dict):
        self.desc, self.fd = desc, desc.get("fd")
        if self.fd is not None:
            self.writable = desc.get("writable", True)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self._map = mmap.mmap(self.fd, os.fstat(self.fd).st_size, prot=prot)
        else:
            shm, self.writable = posix_ipc.SharedMemory(desc["segment"]), True
            self._map = mmap.mmap(shm.fd, shm.size)
            shm.close_fd()
        self.shape, self.dtype = tuple(desc["shape"]), desc["dtype"]

    def numpy(self) -> np.ndarray:
        if self.dtype not in NUMPY_DTYPES:
            raise TypeError(f"numpy has no {self.dtype}; use .torch()")
        count = int(np.prod(self.shape))
        return np.frombuffer(self._map, dtype=NUMPY_DTYPES[self.dtype], count=count,
                             offset=self.desc["offset"]).reshape(self.shape)

    def torch(self):
        import torch
        dtype = getattr(torch, self.dtype)
        count = int(np.prod(self.shape))
        with warnings.catch_warnings():   # a read-only segment makes a read-only tensor: that is the point
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map, dtype=dtype, count=count, offset=self.desc["offset"]).view(self.shape)

    def close(self):
        self._map = None    # unmapped with the last view; mmap.close() under a live view would crash
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
