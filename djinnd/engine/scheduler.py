"""Scheduler: who runs next. Waiting sessions are admitted FIFO as KV blocks allow, asking the
pager to make room (evict per policy) or to bring a swapped session's KV back; a step is either
a prefill of newly admitted sessions or one decode token for every running session (continuous
batching). Work that can never get room is refused, never left to hang."""
from collections import deque

from djinnd.session import KVPlace, Session, SessionState


class Scheduler:
    def __init__(self, pool, pager, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool, self.pager = pool, pager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Session] = deque()
        self.running: list[Session] = []
        self.refused: list[tuple[Session, str]] = []   # drained by the engine

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.state is SessionState.RUNNING for s in self.running)

    def blocks_needed(self, s: Session) -> int:
        """Blocks to reserve so the whole request fits: decode never runs out mid-way."""
        total = len(s.tokens) + s.request.params.max_new_tokens
        return max(0, self.pool.blocks_for(total) - len(s.block_table))

    def add(self, s: Session):
        s.change_state(SessionState.WAITING)
        self.waiting.append(s)

    def schedule(self) -> tuple[list[Session], bool]:
        """The next batch and whether it is a prefill."""
        batch, num_tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            s = self.waiting[0]
            if (num_tokens + s.num_new_tokens > self.max_num_batched_tokens and batch) or not self._room_for(s, batch):
                break   # FIFO: a large head waits for room rather than being starved by small ones
            blocks = self.pool.allocate(self.blocks_needed(s))
            if s.kv is KVPlace.HOST:
                self.pager.restore(s, blocks, "restore")
            else:
                s.block_table += blocks
                s.kv = KVPlace.DEVICE
            self.waiting.popleft()
            s.change_state(SessionState.RUNNING)
            batch.append(s)
            num_tokens += s.num_new_tokens
        if batch:
            self.running.extend(batch)
            return batch, True
        return [s for s in self.running if s.state is SessionState.RUNNING], False   # paused ones wait

    def _room_for(self, s: Session, batch: list) -> bool:
        if s.transfers and s.kv is KVPlace.HOST:
            return False            # its swap-out is still copying; admit it next step
        needed = self.blocks_needed(s)
        if needed <= self.pool.num_free:
            return True
        shortfall = needed - self.pool.num_free - self.pager.freeing()   # evictions in flight count
        if shortfall > 0 and self.pager.make_room(shortfall, s) == 0 and not (self.running or batch or self.pager.busy()):
            self.waiting.popleft()  # nothing runs, nothing can be evicted: it would wait forever
            self.refused.append((s, f"needs {needed} KV blocks, {self.pool.num_free} free and none can be "
                                    f"freed (policy {self.pager.policy}, host arena "
                                    f"{self.pager.arena.num_free}/{self.pager.arena.num_blocks} blocks free)"))
        return False

    def finish(self, s: Session):
        """The request ended: keep the blocks its tokens use, return the unused reservation."""
        self.running.remove(s)
        s.change_state(SessionState.IDLE)
        keep = self.pool.blocks_for(len(s.tokens))
        self.pool.free(s.block_table[keep:])
        del s.block_table[keep:]

    def drop(self, s: Session):
        """Forget a session entirely (closed, or its client died) and free all its KV."""
        if s in self.waiting:
            self.waiting.remove(s)
        if s in self.running:
            self.running.remove(s)
        self.pager.release(s)
