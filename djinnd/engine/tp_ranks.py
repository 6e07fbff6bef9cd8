"""Ranks: the worker processes of a tensor-parallel daemon. Spawned (never forked: CUDA), joined
with rank 0 into one process group through a rendezvous file in a private directory (gloo over
loopback on CPU, NCCL on CUDA), told rank 0's pool size, watched, and stopped.
"""
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import threading
import time

import torch.multiprocessing as mp

from djinnd.engine.tp_mirror import Mirror
from djinnd.engine.tp_worker import init_group, worker_main
from djinnd.memory.host_arena import sweep_stale_segments
from djinnd.model.tp import TP, check_divides


class Ranks:
    def __init__(self, config, device, dtype, max_model_len: int):
        self.world = config.engine.tensor_parallel
        self.dir = tempfile.mkdtemp(prefix="djinn-tp-")     # 0700: the rendezvous is ours alone
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        init_method = f"file://{self.dir}/rendezvous"
        spec = dict(model=config.model.model, seed=config.model.seed, dtype=str(dtype).removeprefix("torch."),
                    device=device.type, world=self.world, backend=self.backend, init_method=init_method,
                    block_size=config.memory.block_size, max_num_seqs=config.engine.max_num_seqs,
                    max_model_len=max_model_len, attention=config.engine.attention,
                    cuda_graphs=config.engine.cuda_graphs, pin_host_arena=config.memory.pin_host_arena)
        spawn = mp.get_context("spawn")
        self.procs, self.conns, self._stopping = [], [], False
        for rank in range(1, self.world):
            mine, theirs = spawn.Pipe()
            p = spawn.Process(target=worker_main, args=(spec, rank, theirs), name=f"djinn-rank-{rank}", daemon=True)
            p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(mine)
        try:
            self._join_group(init_method)
        except BaseException:
            self.close()
            raise
        self.tp = TP(0, self.world)
        self.mirror = Mirror(self.tp, self.conns, device)
        self.device = device

    def _join_group(self, init_method: str):
        """Rank 0 joins the group; a worker that dies first ends the wait with its exit code."""
        failed = []
        joiner = threading.Thread(target=lambda: _try(failed, init_group, self.backend, init_method, 0, self.world),
                                  daemon=True)
        joiner.start()
        while joiner.is_alive():
            self._check_alive("joining the process group")
            joiner.join(0.2)
        if failed:
            raise RuntimeError(f"tensor-parallel process group ({self.backend}): {failed[0]}")

    def _check_alive(self, doing: str):
        for rank, p in enumerate(self.procs, 1):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {p.exitcode} while {doing} "
                                   f"(its traceback is above)")

    def _receive(self, expected: str, doing: str) -> list[dict]:
        out = []
        for conn in self.conns:
            while not conn.poll(0.2):
                self._check_alive(doing)
            method, info = conn.recv()
            assert method == expected, method
            out.append(info)
        return out

    def kv_budget(self, budget: float, free_bytes: int | None) -> float:
        """Rank 0's KV budget, less what the tightest worker GPU lacks next to rank 0's (all ranks hold
        the same number of blocks). Waits for every worker's shard to load."""
        loaded = self._receive("loaded", "loading its weights")
        if free_bytes is None:
            return budget
        return budget - max(0, free_bytes - min(info["free_bytes"] for info in loaded))

    def build(self, pool, arena, weights_bytes: int):
        """Workers build pools and arenas of rank 0's block counts; rank 0 hears they are ready."""
        for conn in self.conns:
            conn.send(("build", (pool.num_blocks, arena.num_blocks)))
        ready = self._receive("ready", "building its KV pool")
        self.mirror.ranks = [{"rank": 0, "pid": os.getpid(), "device": str(self.device), "weights_bytes": weights_bytes,
                              "kv_pool_bytes": pool.num_blocks * pool.block_bytes,
                              "host_arena_bytes": arena.num_blocks * arena.block_bytes}]
        self.mirror.ranks += [{"rank": r, **info} for r, info in enumerate(ready, 1)]

    def watch(self, on_death):
        """A worker that exits while the daemon serves stops the daemon (on_death, from this thread)."""
        def run():
            sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, 1)}
            first = multiprocessing.connection.wait(list(sentinels))[0]
            if self._stopping:
                return
            rank, p = sentinels[first]
            p.join(1)
            self.mirror.dead = f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
            print(f"djinnd: {self.mirror.dead}; the daemon stops", file=sys.stderr, flush=True)
            on_death()
        threading.Thread(target=run, name="djinn-rank-watch", daemon=True).start()

    def close(self):
        """Stop the workers (killed if stuck), unlink their shared memory, remove the rendezvous."""
        self._stopping = True
        for conn in self.conns:
            try:
                conn.send(("stop", ()))
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
            sweep_stale_segments(pid=p.pid)
        shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict:
        alive = [True] + [p.is_alive() for p in self.procs]
        return {**self.mirror.status(), "backend": self.backend, "ranks": [{**r, "alive": alive[r["rank"]]} for r in self.mirror.ranks]}


def _try(failed: list, fn, *args):
    try:
        fn(*args)
    except Exception as e:       # reported by the thread that waits
        failed.append(f"{type(e).__name__}: {e}")


def startup_problem(world: int, args, device, streaming: bool) -> str | None:
    """Why the daemon cannot start `world` ranks for this model here, in one line, or None."""
    why = check_divides(args, world)
    if why:
        return why
    if streaming:
        return (f"--tensor-parallel {world} with --weights-budget-mb: weight streaming serves one GPU; "
                "drop one of the two")
    if device.type != "cuda":
        return None
    if device.index not in (None, 0):
        return f"--tensor-parallel {world}: rank r runs on cuda:r; pass --device cuda, not --device {device}"
    import torch
    seen = torch.cuda.device_count()
    if seen < world:
        missing = ", ".join(f"cuda:{i}" for i in range(seen, world))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"--tensor-parallel {world} needs {world} GPUs: {missing} not visible (this machine shows {seen}"
                + (f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "") + ")")
    return None
