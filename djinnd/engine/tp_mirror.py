"""Mirror: rank 0's side of tensor parallelism. Rank 0 keeps the socket, sessions, scheduler and
pager; before each piece of tensor work on its shard it sends the other ranks the same call (a
method name and plain arguments, over a pipe between our own processes: never anything a client
sent), and tensors the workers cannot rebuild (a hidden state a client edited, the decode rows
the sampler wrote) follow as broadcasts. Every rank then runs the same forward on its shard and
meets the others in the collectives, so the runner, decode batch, CUDA graphs, breakpoints and
steering work on rank 0 as on one GPU; hidden states are replicated after each all-reduce.

Hooks: Runner.forward/logits, DecodeGraphs.run/capture and Swapper.swap_out/swap_in call the
mirror set on the model (`model.mirror`) or the pool (`pool.mirror`) when there is one.
"""
import threading

import torch

from djinnd.model.tp import RankLost


class Mirror:
    def __init__(self, tp, conns: list, device):
        self.tp, self.conns, self.device = tp, conns, torch.device(device)
        self.dead: str | None = None            # why, once a rank died
        self._lock = threading.Lock()           # the engine thread sends; status may ask from another
        self.ranks: list[dict] = []             # filled by tp_ranks at start-up: pid, device, memory per rank

    def send(self, method: str, *args):
        if self.dead:
            raise RankLost(self.dead)
        with self._lock:
            try:
                for conn in self.conns:
                    conn.send((method, args))
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as e:
                raise RankLost(self.dead or f"a tensor-parallel rank stopped: {e}") from None

    # ---- forwards ---------------------------------------------------------------------------
    def prefill(self, meta, chunks, hidden, start: int, stop, after):
        """Before Runner.forward's work: the same forward on every rank. Returns `after` wrapped so
        every rank continues from rank 0's (possibly steered) hidden state after each hooked layer."""
        ids = None if hidden is not None else [t for s, n in chunks for t in s.tokens[s.num_cached:s.num_cached + n]]
        self.send("prefill", meta.query_lens, meta.context_lens, [list(s.block_table) for s, _ in chunks], ids,
                  None if hidden is None else (tuple(hidden.shape), str(hidden.dtype)), start, stop, after is not None)
        if hidden is not None:
            self.tp.broadcast(hidden.contiguous())    # a paused forward's state, as the client left it
        if after is None:
            return None

        def replicated(i, h):
            try:
                h = after(i, h)
            except Exception as e:     # the workers wait in this layer's broadcast: the ranks are out of step
                raise RankLost(f"a hook failed mid-forward under tensor parallelism: {type(e).__name__}: {e}") from e
            return self.tp.broadcast(h.contiguous())
        return replicated

    def logits(self, h):
        """Before model.logits(h) outside the decode graph: every rank gathers its vocabulary shard."""
        self.send("logits", tuple(h.shape), str(h.dtype))
        self.tp.broadcast(h.contiguous())

    def decode(self, batch, n: int, num_blocks, mode: str):
        """Before DecodeGraphs.run: the rows' inputs (the sampler wrote input_ids on rank 0 only)."""
        self.send("decode", n, num_blocks, mode)
        for t in (batch.input_ids, batch.positions, batch.is_live, batch.block_tables):
            self.tp.broadcast(t)
        if mode != "plain":
            self.tp.broadcast(batch.steer[:, :n].contiguous())

    def capture(self):
        self.send("capture")

    # ---- KV swaps: each rank copies its own heads of the same blocks ----------------------------
    def swap_out(self, session: int, device_blocks: list[int], host_runs: list):
        self.send("swap_out", session, list(device_blocks), [tuple(r) for r in host_runs])

    def swap_in(self, session: int, host_runs: list, device_blocks: list[int]):
        self.send("swap_in", session, [tuple(r) for r in host_runs], list(device_blocks))

    def status(self) -> dict:
        """Each rank copies its heads of the same blocks as rank 0: rank 0's swap figures are each rank's."""
        return {"world": self.tp.world, "dead": self.dead, "ranks": self.ranks}
