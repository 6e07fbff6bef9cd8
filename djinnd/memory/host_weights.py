"""HostWeights: the streamed decoder layers' weights, in one anonymous mapping of host memory.

Every streamed layer has the same tensors, so each gets one region of the same layout (the ring's
slots use it too, so one flat copy moves a whole layer). On CUDA the regions are page-locked with
cudaHostRegister one layer at a time on a background thread (~0.8 s per GB); a copy never spans two
registrations, and a copy from a region not yet pinned is merely slower.
"""
import mmap
import threading
import time
import weakref

import torch

ALIGN = 256          # bytes between tensors of a layer: keeps every view aligned for any kernel


def layer_layout(shapes: dict, dtype) -> tuple[dict, int]:
    """name -> byte offset of each tensor in a layer's region, and the region's size."""
    elsize, offsets, cursor = torch.empty((), dtype=dtype).element_size(), {}, 0
    for name, shape in shapes.items():
        offsets[name] = cursor
        cursor += -(-torch.Size(shape).numel() * elsize // ALIGN) * ALIGN
    return offsets, cursor


def tensor_views(flat: torch.Tensor, shapes: dict, offsets: dict, dtype) -> dict:
    """Views of one layer's tensors on its flat uint8 region (made once)."""
    elsize = torch.empty((), dtype=dtype).element_size()
    return {name: flat[offsets[name]:offsets[name] + torch.Size(shape).numel() * elsize].view(dtype).view(shape)
            for name, shape in shapes.items()}


def _release(mapping, pinned: list, pin_thread):
    """Unregister before the mapping can go (a freed, still-registered range poisons the next mmap)."""
    if pin_thread and pin_thread.ident is not None:
        pin_thread.join()
    if pinned:
        from djinnd.memory.cudart import host_unregister
        for ptr in pinned:
            host_unregister(ptr)
        pinned.clear()


class HostWeights:
    def __init__(self, num_layers: int, shapes: dict, dtype, pin: bool):
        """Room for num_layers layers, each holding tensors of `shapes` (name -> shape)."""
        self.num_layers, self.shapes, self.dtype = num_layers, shapes, dtype
        self.offsets, self.layer_bytes = layer_layout(shapes, dtype)
        self.stride = -(-self.layer_bytes // mmap.PAGESIZE) * mmap.PAGESIZE     # regions start on pages
        self._map = mmap.mmap(-1, max(num_layers * self.stride, mmap.PAGESIZE))
        flat = torch.frombuffer(self._map, dtype=torch.uint8)
        self.flat = [flat[j * self.stride:j * self.stride + self.layer_bytes] for j in range(num_layers)]
        self.tensors = [tensor_views(f, shapes, self.offsets, dtype) for f in self.flat]
        self.pin_seconds = None          # set once every region is page-locked
        self._pinned: list[int] = []
        self._pin_thread = threading.Thread(target=self._pin, daemon=True) if pin and num_layers else None
        self._finalizer = weakref.finalize(self, _release, self._map, self._pinned, self._pin_thread)

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def start_pinning(self):
        """Page-lock in the background (after filling: first-touch page faults are cheaper unpinned)."""
        if self._pin_thread and not self._pin_thread.is_alive() and self.pin_seconds is None:
            self._pin_thread.start()

    def _pin(self):
        from djinnd.memory.cudart import host_register
        started = time.perf_counter()
        for f in self.flat:
            host_register(f.data_ptr(), self.layer_bytes)
            self._pinned.append(f.data_ptr())
        self.pin_seconds = time.perf_counter() - started

    def wait_pinned(self):
        """Block until every region is page-locked (benchmarks; the daemon never waits)."""
        self.start_pinning()
        if self._pin_thread:
            self._pin_thread.join()

    def close(self):
        self._finalizer()
