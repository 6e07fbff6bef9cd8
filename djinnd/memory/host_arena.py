"""HostArena: swapped-out KV blocks live here, in a sealed memfd of this daemon.

It has no name in /dev/shm and its descriptor is closed once mapped, so no other process can open,
shrink or grow it (seals too); it goes with the process, even after kill -9. Older daemons named
their segments djinn-<pid>-...; the stale sweep still removes those a crash left.
The daemon checks /dev/shm's free space against the arena before it starts (preflight.py); pages
are not reserved up front (that would commit the whole arena at start). On CUDA the mapping is page-locked with cudaHostRegister in chunks on a background thread
(registering costs ~0.8 s per GB), so start-up is not blocked; copies to a chunk not yet pinned
are merely slower. Segments are unlinked on close and, after a crash, at the next start.
"""
import fcntl
import itertools
import math
import mmap
import os
import re
import secrets
import threading
import time
import weakref

import torch

SEGMENT_PREFIX = "djinn-"


_serial = itertools.count()


def segment_name(pid: int) -> str:
    return f"/{SEGMENT_PREFIX}{pid}-kv{next(_serial)}-{secrets.token_hex(12)}"


def _release(mapping, pinned: list, pin_thread):
    """Unregister before the mapping can go (a freed, still-registered range poisons the next
    mmap at that address). Holding `mapping` keeps it alive until here."""
    if pin_thread:
        pin_thread.join()
    if pinned:
        from djinnd.memory.cudart import host_unregister
        for ptr, _ in pinned:
            host_unregister(ptr)
        pinned.clear()


def sweep_stale_segments(shm_dir: str = "/dev/shm", pid: int | None = None) -> list[str]:
    """Unlink our uid's segments of djinnd processes that no longer exist (or, given `pid`, of that
    process: the daemon's own at exit). Never fails: a segment that vanishes or is not ours stays."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(rf"{SEGMENT_PREFIX}(\d+)-.+", name)
        if not m or (int(m.group(1)) != pid if pid is not None else _pid_alive(int(m.group(1)))):
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
            if st.st_uid == os.getuid() and os.path.isfile(path):
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class HostArena:
    def __init__(self, num_blocks: int, block_shape: tuple, dtype, pin: bool, pin_chunk_bytes: int = 256 << 20):
        """num_blocks host blocks, each of block_shape ([2, layers, block_size, kv_heads, head_dim])."""
        self.num_blocks = num_blocks
        self.block_bytes = torch.Size(block_shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.size = max(self.num_blocks * self.block_bytes, mmap.PAGESIZE)
        self.name = "memfd:" + segment_name(os.getpid())[1:]
        fd = os.memfd_create(self.name[6:], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, self.size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        count = num_blocks * torch.Size(block_shape).numel()
        self.blocks = (torch.frombuffer(self._map, dtype=dtype, count=count) if count
                       else torch.empty(0, dtype=dtype)).view(num_blocks, *block_shape)
        self._free = [(0, num_blocks)]            # sorted (start, length) runs
        self.num_used = 0
        self.pin_seconds = None                   # set once every chunk is page-locked
        # Chunks are whole blocks and whole pages; a copy never spans two (CUDA refuses a copy
        # across two registrations).
        page_blocks = mmap.PAGESIZE // math.gcd(self.block_bytes, mmap.PAGESIZE) if self.block_bytes else 1
        self.chunk_blocks = max(page_blocks, pin_chunk_bytes // max(self.block_bytes, 1) // page_blocks * page_blocks)
        self._pinned: list[tuple[int, int]] = []
        self._pin_thread = None
        if pin and num_blocks:
            self._pin_thread = threading.Thread(target=self._pin, daemon=True)
            self._pin_thread.start()
        self._finalizer = weakref.finalize(self, _release, self._map, self._pinned, self._pin_thread)

    # ---- runs of host blocks ---------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[tuple[int, int]]:
        """n blocks as few (start, length) runs as first fit allows; one run when it can."""
        if not self.can_allocate(n):
            raise MemoryError(f"host arena: asked for {n} blocks, {self.num_free} free")
        whole = next((i for i, (_, length) in enumerate(self._free) if length >= n), None)
        order = [whole] if whole is not None else list(range(len(self._free)))
        runs, left = [], n
        for i in order:
            start, length = self._free[i]
            take = min(length, left)
            runs.append((start, take))
            left -= take
            if left == 0:
                break
        for start, take in runs:
            self._carve(start, take)
        self.num_used += n
        return runs

    def _carve(self, start: int, take: int):
        i = next(i for i, (s, _) in enumerate(self._free) if s == start)
        s, length = self._free[i]
        if take == length:
            del self._free[i]
        else:
            self._free[i] = (s + take, length - take)

    def free(self, runs: list[tuple[int, int]]):
        merged = sorted(self._free + list(runs))
        self._free = []
        for start, length in merged:       # coalesce neighbours
            if self._free and self._free[-1][0] + self._free[-1][1] == start:
                self._free[-1] = (self._free[-1][0], self._free[-1][1] + length)
            else:
                self._free.append((start, length))
        self.num_used -= sum(length for _, length in runs)

    # ---- pinning and teardown ----------------------------------------------------------------
    def pieces(self, runs):
        """Split runs at chunk boundaries: each piece lies in one registration."""
        for start, length in runs:
            while length:
                take = min(length, self.chunk_blocks - start % self.chunk_blocks)
                yield start, take
                start, length = start + take, length - take

    def _pin(self):
        from djinnd.memory.cudart import host_register
        base, started = self.blocks.data_ptr(), time.perf_counter()
        for first in range(0, self.num_blocks, self.chunk_blocks):
            count = min(self.chunk_blocks, self.num_blocks - first)
            host_register(base + first * self.block_bytes, count * self.block_bytes)
            self._pinned.append((base + first * self.block_bytes, count * self.block_bytes))
        self.pin_seconds = time.perf_counter() - started

    def wait_pinned(self):
        """Block until every chunk is page-locked (benchmarks; the daemon never waits)."""
        if self._pin_thread:
            self._pin_thread.join()

    def close(self):
        self._finalizer()              # the mapping itself goes with its last view (see activations.py)
