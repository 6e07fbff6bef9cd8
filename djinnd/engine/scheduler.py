"""Scheduler: who runs next. Waiting sessions are admitted FIFO as KV blocks allow; a step is
either a prefill of newly admitted sessions or one decode token for every running session
(continuous batching). Pure Python over the pool's free list."""
from collections import deque

from djinnd.session import Session, SessionState


class Scheduler:
    def __init__(self, pool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Session] = deque()
        self.running: list[Session] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

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
            over_budget = num_tokens + s.num_new_tokens > self.max_num_batched_tokens
            if (over_budget and batch) or not self.pool.can_allocate(self.blocks_needed(s)):
                break   # FIFO: a large head waits for room rather than being starved by small ones
            s.block_table += self.pool.allocate(self.blocks_needed(s))
            self.waiting.popleft()
            s.change_state(SessionState.RUNNING)
            batch.append(s)
            num_tokens += s.num_new_tokens
        if batch:
            self.running.extend(batch)
            return batch, True
        return list(self.running), False

    def finish(self, s: Session):
        """The request ended: keep the blocks its tokens use, return the unused reservation."""
        self.running.remove(s)
        s.change_state(SessionState.IDLE)
        keep = self.pool.blocks_for(len(s.tokens))
        self.pool.free(s.block_table[keep:])
        del s.block_table[keep:]

    def drop(self, s: Session):
        """Forget a session entirely (closed, or its client died) and free all its blocks."""
        if s in self.waiting:
            self.waiting.remove(s)
        if s in self.running:
            self.running.remove(s)
        self.pool.free(s.block_table)
        s.block_table = []
