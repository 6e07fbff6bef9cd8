"""Scheduler: who runs next. Waiting sessions are admitted in order as KV blocks allow, asking the
pager to make room (evict per policy) or to bring a swapped session's KV back. The order
(`admission`) is the requests' arrival (fifo); or fewest tokens to feed first (shortest: a turn
that continues its history goes ahead of new agents' long first prompts, in admission and in the
step's prompt budget); or session age (program: first come, first served between programs).
Out of arrival order, a request that has waited max_wait_s goes first, so nothing starves.
A step decodes one token for every running session whose prompt is done and feeds prefilling
sessions chunks of their prompts within a token budget, so a long prompt never stalls the
sessions decoding (chunked prefill). Work that can never get room is refused, never left to hang."""
import time
from collections import deque
from dataclasses import dataclass, field

from djinnd.engine import prefix_admission
from djinnd.engine.step_budget import StepBudget
from djinnd.session import KVPlace, Session, SessionState


@dataclass
class Plan:
    decode: list[Session] = field(default_factory=list)               # one uncached token each
    prefill: list[tuple[Session, int]] = field(default_factory=list)  # session, tokens to feed now


ORDER_KEYS = {                # admission -> what the waiting queue is sorted by (None: arrival)
    "fifo": None,
    "program": lambda s: s.id,                 # session ids grow with age
    "shortest": lambda s: s.num_new_tokens,    # prompt tokens to feed: a continued turn before a new prompt
}


class Scheduler:
    def __init__(self, pool, pager, max_num_seqs: int, max_num_batched_tokens: int, admission: str = "fifo",
                 max_wait_s: float = 5.0, capacity_wait_s: float = 5.0, max_step_ms: float = 0.0,
                 chunk_sizes: list[int] | None = None):
        self.pool, self.pager = pool, pager
        self.capacity_wait_s = capacity_wait_s   # room held only by paused sessions: refused after this
        self.order_key = ORDER_KEYS[admission]
        self.shortest_first = admission == "shortest"   # the step's prompt budget goes in that order too
        self.max_wait_s = max_wait_s        # a request waiting longer goes in arrival order
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.budget = StepBudget(max_step_ms, chunk_sizes)   # prompt tokens a step feeds beside decoding rows
        self.waiting: deque[Session] = deque()
        self.running: list[Session] = []
        self.refused: list[tuple[Session, str]] = []   # drained by the engine

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.state is SessionState.RUNNING for s in self.running)

    def blocks_needed(self, s: Session) -> int:
        """Blocks to reserve so the whole request fits (decode never runs out mid-way), less the
        shared prefix blocks other sessions hold already. KV on the host: what bringing it back
        takes (pager.restore_size), then the rest of the reservation."""
        if s.kv is KVPlace.HOST:
            restored = len(s.block_keys) + sum(n for _, n in s.host_runs)
            return self.pager.restore_size(s) + max(0, self._blocks_total(s) - restored)
        cow = max(0, len(s.block_keys) - s.num_cached // self.pool.block_size)  # copies of shared blocks it cut in
        return max(0, self._blocks_total(s) - len(s.block_table) - prefix_admission.shared_held(self.pager, s) + cow)

    def _blocks_total(self, s: Session) -> int:
        return self.pool.blocks_for(len(s.tokens) + s.request.params.max_new_tokens)

    def add(self, s: Session):
        s.change_state(SessionState.WAITING)
        self.waiting.append(s)
        if self.order_key:          # usually s goes last already (program) or near the end
            key, i = self.order_key(s), len(self.waiting) - 1
            while i > 0 and self.order_key(self.waiting[i - 1]) > key:
                i -= 1
            if i < len(self.waiting) - 1:
                self.waiting.pop()
                self.waiting.insert(i, s)

    def schedule(self) -> Plan:
        """This step's work: admit what fits, then decode everyone ready and prefill within budget."""
        self._admit()
        plan = Plan()
        running = sorted(self.running, key=lambda s: s.num_new_tokens) if self.shortest_first else self.running
        decoding = any(s.num_new_tokens == 1 and s.state is SessionState.RUNNING for s in running)
        prompts = [(s.num_cached, s.num_new_tokens) for s in running                 # attention grows with prefix
                   if s.state is SessionState.RUNNING and s.num_new_tokens > 1]
        budget = self.budget.tokens(decoding, self.max_num_batched_tokens, prompts)
        for s in running:
            if s.state is not SessionState.RUNNING:
                continue                     # paused at a breakpoint: waits for its client
            if s.num_new_tokens == 1:
                plan.decode.append(s)
            elif budget > 0:
                plan.prefill.append((s, min(s.num_new_tokens, budget)))
                budget -= plan.prefill[-1][1]
        return plan

    def _admit(self):
        while self.waiting and len(self.running) < self.max_num_seqs:
            s = self._head()
            if self._prompt_ahead(s) >= self.max_num_batched_tokens or not self._room_for(s):
                break   # in order: a large head waits for room rather than being starved by small ones
            if s.kv is KVPlace.HOST:
                if not self.pager.restore(s, "restore"):
                    break               # room counted just now: cannot happen, but never admit it swapped
            else:
                prefix_admission.attach_prefix(self.pager, s)     # known blocks of its prompt: only the rest is fed
                if s.kv is KVPlace.DROPPED:     # its history is prefilled again: GPU time the drop cost
                    self.pager.metrics.inc("recomputed_tokens", max(0, len(s.tokens) - s.num_cached
                                                                    - s.request.num_prompt_tokens))
                s.kv = KVPlace.DEVICE
            prefix_admission.copy_on_write(self.pager, s)
            s.block_table += self.pool.allocate(max(0, self._blocks_total(s) - len(s.block_table)))
            self.waiting.remove(s)
            s.change_state(SessionState.RUNNING)
            self.running.append(s)

    def _prompt_ahead(self, s: Session) -> int:
        """Prompt tokens admitted but not yet fed that the step's budget serves before s's."""
        return sum(r.num_new_tokens for r in self.running if r.num_new_tokens > 1
                   and not (self.shortest_first and r.num_new_tokens > s.num_new_tokens))

    def _head(self) -> Session:
        """Next to admit: the queue's head; out of arrival order, the longest-waiting request once
        any has waited past max_wait_s, so no request's wait grows without bound under overload."""
        if self.order_key:
            now = time.monotonic()
            overdue = [s for s in self.waiting if now - s.request.queued_at > self.max_wait_s]
            if overdue:
                return min(overdue, key=lambda s: s.request.queued_at)
        return self.waiting[0]

    def _room_for(self, s: Session) -> bool:
        if s.transfers and s.kv is KVPlace.HOST:
            return False            # its swap-out is still copying; admit it next step
        needed = self.blocks_needed(s)
        if needed <= self.pool.num_free:
            return True
        shortfall = needed - self.pool.num_free - self.pager.freeing()   # evictions in flight count
        if shortfall > 0 and self.pager.make_room(shortfall, s) == 0 and not self.pager.busy() and self._stuck(s):
            self.waiting.remove(s)  # nothing runs, nothing can be evicted: it would wait forever
            self.refused.append((s, f"needs {needed} KV blocks, {self.pool.num_free} free and none can be "
                                    f"freed (policy {self.pager.policy}, host arena "
                                    f"{self.pager.arena.num_free}/{self.pager.arena.num_blocks} blocks free)"))
        return False

    def _stuck(self, s: Session) -> bool:
        """Nothing will free room for s: nothing runs, or all that runs is paused at breakpoints (their
        clients decide when they go on) and s has waited capacity_wait_s."""
        if any(r.state is SessionState.RUNNING for r in self.running):
            return False
        return not self.running or time.monotonic() - s.request.queued_at > self.capacity_wait_s

    def finish(self, s: Session):
        """The request ended: keep the blocks its tokens use, return the unused reservation."""
        self.running.remove(s)
        s.change_state(SessionState.IDLE)
        keep = self.pool.blocks_for(len(s.tokens))
        self.pool.free(s.block_table[keep:])
        del s.block_table[keep:]
        prefix_admission.settle(self.pager, s)        # its full blocks become known to the prefix cache

    def drop(self, s: Session):
        """Forget a session entirely (closed, or its client died) and free all its KV."""
        if s in self.waiting:
            self.waiting.remove(s)
        if s in self.running:
            self.running.remove(s)
        self.pager.release(s)
