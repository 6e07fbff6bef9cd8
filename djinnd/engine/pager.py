"""Pager: moves sessions' KV between the device pool and the host arena as the policy says.

Called by the engine on phase signals and timers, and by the scheduler when admission needs
room or a swapped session needs its KV back. Blocks a copy still reads or writes are freed
only when the swapper reports the copy finished.
"""
import time

from djinnd.memory import policies
from djinnd.session import KVPlace, Phase, Session, SessionState


class Pager:
    def __init__(self, policy: str, pool, arena, swapper, prefetch_lead_s: float):
        self.policy, self.pool, self.arena, self.swapper = policy, pool, arena, swapper
        self.prefetch_lead_s = prefetch_lead_s
        self.sessions: dict[int, Session] = {}

    # ---- signals ----------------------------------------------------------------------------
    def on_phase(self, s: Session, phase: Phase, expected_s: float | None):
        s.phase = phase
        s.prefetch_at = None
        if not policies.evicts_on_signal(self.policy):
            return
        if phase is Phase.IO_WAIT:
            if policies.evictable(s):
                self.evict(s, "signal")
            if expected_s is not None:
                s.prefetch_at = time.monotonic() + max(0.0, expected_s - self.prefetch_lead_s)
        else:
            self.prefetch(s)

    def tick(self) -> float | None:
        """Start prefetches whose time has come; seconds until the next one, if any."""
        now, soonest = time.monotonic(), None
        for s in self.sessions.values():
            if s.prefetch_at is None:
                continue
            if s.prefetch_at <= now:
                s.prefetch_at = None
                self.prefetch(s)
            else:
                soonest = min(soonest or 1e9, s.prefetch_at - now)
        return soonest

    # ---- moves -------------------------------------------------------------------------------
    def evict(self, s: Session, cause: str) -> bool:
        blocks = s.block_table
        if not policies.evicts_by_copy(self.policy):
            self.pool.free(blocks)
            s.block_table, s.num_cached, s.kv = [], 0, KVPlace.DROPPED
            return True
        if not self.arena.can_allocate(len(blocks)):
            return False        # host arena full: the KV stays where it is
        runs = self.arena.allocate(len(blocks))
        s.transfers.append(self.swapper.swap_out(s.id, blocks, runs, cause))
        s.transfers[-1].free_device = blocks
        s.block_table, s.host_runs, s.kv = [], runs, KVPlace.HOST
        return True

    def restore(self, s: Session, blocks: list[int], cause: str):
        """Copy s's swapped KV into the first of `blocks` (allocated for it by the caller)."""
        n = sum(length for _, length in s.host_runs)
        t = self.swapper.swap_in(s.id, s.host_runs, blocks[:n], cause, after=list(s.transfers))
        t.free_host = s.host_runs
        s.transfers.append(t)
        s.host_runs, s.kv, s.block_table = [], KVPlace.DEVICE, blocks

    def prefetch(self, s: Session):
        n = sum(length for _, length in s.host_runs)
        if s.kv is KVPlace.HOST and s.state is SessionState.IDLE and self.pool.can_allocate(n):
            self.restore(s, self.pool.allocate(n), "prefetch")
            s.prefetched = True

    def make_room(self, num_blocks: int, admitting: Session) -> int:
        """Evict per policy toward num_blocks free device blocks for `admitting`; returns blocks set
        free or on the way."""
        freed = 0
        for s in policies.victims(self.policy, self.sessions.values(), num_blocks, exclude=admitting):
            n = len(s.block_table)
            if self.evict(s, "pressure"):
                freed += n
        return freed

    # ---- bookkeeping -------------------------------------------------------------------------
    def poll(self):
        for t in self.swapper.poll():
            self.pool.free(t.free_device)
            self.arena.free(t.free_host)
            s = self.sessions.get(t.session)
            if s is not None and t in s.transfers:
                s.transfers.remove(t)

    def freeing(self) -> int:
        """Device blocks that copies in flight will set free."""
        return sum(len(t.free_device) for t in self.swapper.in_flight)

    def busy(self) -> bool:
        return bool(self.swapper.in_flight)

    def before_forward(self, batch: list[Session]):
        self.swapper.wait_before_compute([t for s in batch for t in s.transfers if t.direction == "in"])

    def release(self, s: Session):
        """Session gone: free its KV now, or when the copies that touch it finish."""
        if s.transfers:
            last = s.transfers[-1]
            last.free_device += s.block_table
            last.free_host += s.host_runs
        else:
            self.pool.free(s.block_table)
            self.arena.free(s.host_runs)
        s.block_table, s.host_runs = [], []
        self.sessions.pop(s.id, None)

    def truncate(self, s: Session, keep: int):
        """Cut an idle session's history to its first `keep` tokens and free the KV blocks past them.
        The K/V of the tokens kept does not depend on later ones, so it stays valid wherever it is."""
        if keep >= len(s.tokens):
            return
        del s.tokens[keep:]
        s.num_cached = min(s.num_cached, keep)
        n = self.pool.blocks_for(s.num_cached)
        if s.kv is KVPlace.HOST:
            s.host_runs, spare = split_runs(s.host_runs, n)
            self._free_after_copies(s, [], spare)
            if not s.host_runs:
                s.kv = KVPlace.DEVICE      # nothing left to bring back
        else:
            spare, s.block_table = s.block_table[n:], s.block_table[:n]
            self._free_after_copies(s, spare, [])

    def _free_after_copies(self, s: Session, blocks: list[int], runs: list):
        if s.transfers:     # a copy may still read or write them
            s.transfers[-1].free_device += blocks
            s.transfers[-1].free_host += runs
        else:
            self.pool.free(blocks)
            self.arena.free(runs)


def split_runs(runs: list, n: int) -> tuple[list, list]:
    """Host runs -> (runs of their first n blocks, runs of the rest)."""
    head, tail = [], []
    for start, length in runs:
        take = max(0, min(length, n))
        if take:
            head.append((start, take))
        if length > take:
            tail.append((start + take, length - take))
        n -= take
    return head, tail
