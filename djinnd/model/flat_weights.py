"""FlatWeights: every parameter of a loaded model packed into one flat device buffer, so the whole set
is exported at once: one CUDA IPC handle on GPU (per-tensor handles cost ~1 ms each to open), one
sealed memfd on CPU. Parameters are re-pointed to views of the buffer once, at start-up, so
their addresses never change afterwards (CUDA graphs captured later stay valid) and tied weights
stay tied (the same Parameter is re-pointed once).

    buffer: | param 0 | pad to 256 B | param 1 | pad | ... |      (offsets in `layout`)
"""
import fcntl
import mmap
import os
import secrets
import weakref
from dataclasses import dataclass

import torch

from djinnd.model.llama import hf_state_dict

ALIGN = 256                   # bytes; what cuBLAS and the Triton kernels like a tensor to start on
LAYOUT_VERSION = 1            # bump when the attach payload changes shape
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Unexported:
    """Why the weights have no export: attach is refused with this reason."""
    reason: str


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


F_SEAL_FUTURE_WRITE = 0x10   # Linux 5.1: no new writable mapping, no write(); ours stays writable


class ShmBuffer:
    """A uint8 tensor over a memfd: no name in /dev/shm to open, and once sealed nobody can shrink, grow
    or write it (a truncation made the next generate die of SIGBUS); attached processes get a file
    descriptor beside the reply (SCM_RIGHTS) and can only map it read-only."""

    def __init__(self, nbytes: int, shm_dir: str = "/dev/shm"):
        free = _shm_free_bytes(shm_dir)
        if free is not None and free < nbytes:   # writing past what tmpfs holds is a SIGBUS, not an error
            raise MemoryError(f"{shm_dir} has {free / 2**20:,.0f} MiB free; the weights need "
                              f"{nbytes / 2**20:,.0f} MiB (grow it, or set export_weights: false)")
        self.name = f"memfd:djinn-weights-{secrets.token_hex(4)}"
        self.fd = os.memfd_create(self.name[6:], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, max(nbytes, 1))
        self._map = mmap.mmap(self.fd, max(nbytes, 1))
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes)
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def seal(self):
        """After packing: sizes fixed for everyone, contents fixed for everyone but our own mapping."""
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals | F_SEAL_FUTURE_WRITE)
        except OSError:           # before Linux 5.1: size seals only; attached maps are PROT_READ anyway
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)

    def close(self):
        self._finalizer()         # the mapping itself lives as long as the parameters viewing it


def _shm_free_bytes(shm_dir: str) -> int | None:
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class FlatWeights:
    """The packed buffer, its layout (HF names -> byte offsets) and the handle that exports it."""

    def __init__(self, model, device):
        self.device = torch.device(device)
        params = list(model.parameters())     # each tied Parameter once
        offsets, self.nbytes = _offsets(params)
        self.shm = ShmBuffer(self.nbytes) if self.device.type == "cpu" else None
        staged = self.device.type == "cuda" and not _fits_twice(self.nbytes, self.device)
        if staged:                # no room for a second copy while packing: go through host memory
            _stage_on_host(params)
        self.buffer = self.shm.tensor if self.shm else torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        with torch.no_grad():
            for p, offset in zip(params, offsets):
                view = self.buffer[offset:offset + _nbytes(p)].view(p.dtype).view(p.shape)
                view.copy_(p.data)
                p.data = view
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the unpacked copies go back to the driver before the KV pool is sized
        if self.shm:
            self.shm.seal()
        self.layout = self._layout(model)
        self.cuda_ipc = None      # made at the first attach: an IPC handle pins the buffer for the process's life

    def _layout(self, model) -> list:
        """[name, byte offset, shape, dtype] per HF-named tensor (q/k/v, gate/up are row slices)."""
        base, out = self.buffer.data_ptr(), []
        for name, t in hf_state_dict(model).items():
            offset = t.data_ptr() - base
            if not (t.is_contiguous() and 0 <= offset and offset + t.numel() * t.element_size() <= self.nbytes):
                raise RuntimeError(f"weights export: {name} does not lie in the flat buffer")
            out.append([name, offset, list(t.shape), DTYPE_NAMES[t.dtype]])
        return out

    def handle(self) -> dict:
        """What an attaching process needs to map the buffer: kind, and the segment or IPC handle."""
        if self.shm:
            return {"kind": "shm", "segment": self.shm.name}
        if self.cuda_ipc is None:
            self.cuda_ipc = list(self.buffer.untyped_storage()._share_cuda_())
        return {"kind": "cuda_ipc", "ipc": self.cuda_ipc}

    def share(self) -> dict:
        """handle() for one attaching process: on CPU with a duplicate of the memfd, which the server
        sends beside the reply and closes."""
        return self.handle() | ({"fd": os.dup(self.shm.fd)} if self.shm else {})

    def close(self):
        if self.shm:
            self.shm.close()


def _nbytes(p) -> int:
    return p.numel() * p.element_size()


def _offsets(params) -> tuple[list[int], int]:
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total = _align(total + _nbytes(p))
    return offsets, total


def _fits_twice(nbytes: int, device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return free > nbytes + (256 << 20)


def _stage_on_host(params):
    for p in params:
        p.data = p.data.cpu()
    torch.cuda.empty_cache()


def pack_weights(model, enabled: bool = True) -> "FlatWeights | Unexported":
    """Pack `model`'s parameters into one exportable buffer on their device, or say why not."""
    if not enabled:
        return Unexported("djinnd runs with export_weights: false")
    if getattr(model, "streamer", None) is not None:
        return Unexported("the model is streamed (weights exceed the weight budget): its layers are not resident")
    try:
        return FlatWeights(model, next(model.parameters()).device)
    except (MemoryError, torch.OutOfMemoryError, OSError) as e:
        return Unexported(f"packing the weights failed: {e}")
