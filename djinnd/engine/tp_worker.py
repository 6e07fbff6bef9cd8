"""A tensor-parallel worker rank (1..N-1): one process, one GPU (or the CPU with gloo), its shard of
the weights and of the KV pool and host arena. It owns no sessions: it runs what rank 0's Mirror
(engine/tp_mirror.py) announces, in order, and meets rank 0 in the collectives.
"""
import os
import signal
import sys
import threading
import time
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist

from djinnd.engine.decode_batch import DecodeBatch
from djinnd.engine.graphs import DecodeGraphs
from djinnd.memory.block_pool import KVBlockPool, bytes_per_block
from djinnd.memory.host_arena import HostArena
from djinnd.memory.swapper import Swapper
from djinnd.metrics import Metrics
from djinnd.model.attention import ForwardContext, build_prefill_metadata, prefill_attention
from djinnd.model.loader import load_model
from djinnd.model.tp import TP


def init_group(backend: str, init_method: str, rank: int, world: int):
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")    # ranks of one host talk over loopback
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    else:                # NCCL bound to this rank's GPU from the start (cuda:{rank})
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))


def worker_main(spec: dict, rank: int, conn):
    """Entry point of a spawned rank; exits non-zero (rank 0 notices) on any failure."""
    for sig in (signal.SIGINT, signal.SIGTERM):   # a terminal's Ctrl-C or systemd's SIGTERM reaches the whole
        signal.signal(sig, signal.SIG_IGN)         # group: rank 0 stops the workers; they must not look dead first
    _exit_with_parent(os.getppid())
    try:
        device = torch.device(f"cuda:{rank}" if spec["device"] == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_group(spec["backend"], spec["init_method"], rank, spec["world"])
        replica = Replica(spec, TP(rank, spec["world"]), device, conn)
        replica.serve()
    except (EOFError, KeyboardInterrupt):
        os._exit(0)                     # rank 0 went away
    except BaseException:
        traceback.print_exc()
        print(f"djinnd: tensor-parallel rank {rank} failed", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)    # skip interpreter teardown: a communicator whose peer left can block in its destructor


def _exit_with_parent(parent: int):
    """A rank blocked in a collective (NCCL waits forever) still ends when rank 0 is gone."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="djinn-rank-watch", daemon=True).start()


CALLS = {"prefill", "logits", "decode", "capture", "swap_out", "swap_in"}    # what tp_mirror.Mirror announces


class Replica:
    def __init__(self, spec: dict, tp: TP, device, conn):
        self.tp, self.device, self.conn = tp, device, conn
        self.dtype = getattr(torch, spec["dtype"])
        self.model = load_model(spec["model"], spec["seed"], self.dtype, device, tp).model
        a = self.model.args
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        conn.send(("loaded", {"weights_bytes": weights, "free_bytes": free}))
        method, (num_blocks, arena_blocks) = conn.recv()
        assert method == "build", method
        heads = a.num_kv_heads // tp.world      # the same block count as rank 0: a budget of exactly that
        per_block = bytes_per_block(a.num_layers, heads, a.head_dim, spec["block_size"], self.dtype)
        self.pool = KVBlockPool(a.num_layers, heads, a.head_dim, spec["block_size"], (num_blocks + 1) * per_block,
                                self.dtype, device)
        self.arena = HostArena(arena_blocks, self.pool.host_block_shape, self.dtype,
                               pin=spec["pin_host_arena"] and device.type == "cuda")
        self.swapper = Swapper(self.pool, self.arena, device, Metrics())
        stand_in = SimpleNamespace(hidden_size=a.hidden_size, dtype=self.dtype)   # steer/stage tables, no sessions
        self.batch = DecodeBatch(spec["max_num_seqs"], self.pool.blocks_for(spec["max_model_len"]),
                                 self.pool.scratch_block, device, stand_in, a.num_layers)
        self.decoder = DecodeGraphs(self.model, self.pool, self.batch, device, spec["attention"], spec["cuda_graphs"])
        conn.send(("ready", {"pid": os.getpid(), "device": str(device), "weights_bytes": weights,
                             "kv_pool_bytes": self.pool.num_blocks * self.pool.block_bytes,
                             "host_arena_bytes": self.arena.num_blocks * self.arena.block_bytes}))

    @torch.inference_mode()
    def serve(self):
        try:
            while True:
                method, args = self.conn.recv()
                if method == "stop":
                    return
                if method not in CALLS:
                    raise ValueError(f"rank 0 sent an unknown call {method!r}")
                getattr(self, method)(*args)
                self.swapper.poll()
        finally:
            self.arena.close()

    def _before_compute(self):
        """Conservative ordering on CUDA: this rank's forward waits (on the stream) for its copies in
        flight, since rank 0's pager frees and reuses blocks once rank 0's own copies are done."""
        self.swapper.wait_before_compute(self.swapper.in_flight)

    def prefill(self, query_lens, context_lens, tables, ids, hidden, start, stop, hooked):
        self._before_compute()
        meta = build_prefill_metadata(query_lens, context_lens, tables, self.pool.block_size, self.device)
        if ids is not None:
            h = self.model.embed(torch.tensor(ids).to(self.device, non_blocking=True))
        else:
            shape, dtype = hidden
            h = self.tp.broadcast(torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")),
                                              device=self.device))
        cos, sin = self.model.rope(meta.positions, h.dtype)
        attend = lambda q, k, v, kc, vc: prefill_attention(q, k, v, kc, vc, meta)  # noqa: E731
        ctx = ForwardContext(cos, sin, meta.slot_mapping, attend, self.decoder.fused)
        after = (lambda i, x: self.tp.broadcast(x.contiguous())) if hooked else None
        self.model.run_layers(h, ctx, self.pool.k, self.pool.v, start, stop, after)

    def logits(self, shape, dtype):
        self._before_compute()
        h = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=self.device)
        self.model.logits(self.tp.broadcast(h))

    def decode(self, n, num_blocks, mode):
        self._before_compute()
        b = self.batch
        for t in (b.input_ids, b.positions, b.is_live, b.block_tables):
            self.tp.broadcast(t)
        if mode != "plain":
            b.steer[:, :n] = self.tp.broadcast(torch.empty_like(b.steer[:, :n]))
        self.decoder.run(n, num_blocks, mode)

    def capture(self):
        self.decoder.capture()

    def swap_out(self, session, device_blocks, host_runs):
        self.swapper.swap_out(session, device_blocks, host_runs, "tp")

    def swap_in(self, session, host_runs, device_blocks):
        after = [t for t in self.swapper.in_flight if t.session == session and t.direction == "out"]
        self.swapper.swap_in(session, host_runs, device_blocks, "tp", after=after)
