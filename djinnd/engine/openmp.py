"""The OpenMP runtime under torch's CPU kernels (libgomp), as the engine thread needs it."""
import ctypes

OMP_PAUSE_SOFT = 1          # omp_pause_resource_t


def release_openmp_threads():
    """Let the calling thread's OpenMP workers go (OpenMP 5.0; a no-op where the runtime lacks it).
    libgomp keeps a pool of workers per thread that ran a parallel op: the thread that built the
    model holds one and the engine thread makes its own. With more pooled threads than cores, idle
    workers spin 100 times instead of ~300,000 before they sleep, so each parallel op of the engine
    thread (SDPA, once per layer) waits for a wake-up: on the 2-core CI machine (2026-12-02) a b1
    decode attention call took 205 us instead of 84, and the forward 64.5 ms instead of 52.9."""
    pause = getattr(ctypes.CDLL(None), "omp_pause_resource_all", None)
    if pause is not None:
        pause(OMP_PAUSE_SOFT)
