"""Reprefill: rebuilds a dropped session's KV ahead of its agent's return while the engine is idle.

Semantic policy only. A session whose KV was dropped (the third tier) during a tool call of known
expected length is prefilled again once its return is nearer than the recompute takes (tokens at
the measured prefill rate) plus prefetch_lead, in chunks of at most max_num_batched_tokens, one per
idle iteration, so a request that comes meanwhile waits one chunk at most. Known blocks of its
history still in the prefix cache are taken first (engine/prefix_admission.take_known). It takes
only free blocks, never below the low-water mark, never room that swapped sessions due back sooner
need, and evicts nobody. No token is sampled: it feeds the history but its last token, the KV a
session that was never dropped holds (the last token goes with the next request's prompt). A
request that comes mid-way continues from num_cached.
"""
import logging
import time

import torch

from djinnd.engine import prefix_admission
from djinnd.memory import policies
from djinnd.session import KVPlace, Phase, Session, SessionState

log = logging.getLogger("djinnd.reprefill")
FIRST_GUESS_S_PER_TOKEN = 1e-4     # until the engine has timed a prefill


class Reprefill:
    def __init__(self, runner, pager, budget, max_tokens: int, enabled: bool = True):
        self.runner, self.pager, self.pool, self.budget = runner, pager, pager.pool, budget
        self.max_tokens = max_tokens
        self.enabled = enabled and policies.prefetches(pager.policy)
        self.metrics = pager.metrics
        self.current: Session | None = None      # the one being fed; partial KV on the device
        self.failed: set[tuple] = set()           # (session id, tool call start): not tried again

    def due_in(self) -> float | None:
        """Seconds until a re-prefill may start: 0 now (one is due and fits), None: none planned."""
        if not self.enabled:
            return None
        now, soonest = time.monotonic(), None
        for s in self._candidates():
            start = policies.returns_at(s) - self._lead_s(s)
            if start <= now:
                if self._fits(s):
                    return 0.0
            elif soonest is None or start - now < soonest:
                soonest = start - now
        return soonest

    def step(self) -> bool:
        """Feed one chunk of the due session returning first that fits. False: nothing to do."""
        if not self.enabled:
            return False
        now = time.monotonic()
        due = [s for s in self._candidates() if policies.returns_at(s) - self._lead_s(s) <= now and self._fits(s)]
        if not due:
            return False
        s = min(due, key=policies.returns_at)
        try:
            self._feed(s)
        except Exception:     # a bug costs this session its re-prefill, never the engine
            log.exception("re-prefill of session %d failed", s.id)
            self.metrics.inc("kv_reprefill_errors")
            self.failed = {f for f in self.failed if f[0] in self.pager.sessions} | {(s.id, s.io_wait_since)}
            self.current = None
            self.pager.drop_kv(s)
        return True

    def _candidates(self) -> list[Session]:
        if self.current is not None and not self._continues(self.current):
            self.current = None
        return [s for s in self.pager.sessions.values()
                if (s.kv is KVPlace.DROPPED or s is self.current) and s.state is SessionState.IDLE
                and s.phase is Phase.IO_WAIT and s.expected_back is not None and _target(s) > s.num_cached
                and (s.id, s.io_wait_since) not in self.failed]

    def _continues(self, s: Session) -> bool:
        """The session fed last is still idle in its tool call with its partial KV on the device."""
        return (s.id in self.pager.sessions and s.kv is KVPlace.DEVICE and s.state is SessionState.IDLE
                and s.phase is Phase.IO_WAIT)

    def _lead_s(self, s: Session) -> float:
        per_token = self.budget.token_s or FIRST_GUESS_S_PER_TOKEN
        return (_target(s) - s.num_cached) * per_token + self.pager.prefetch_lead_s

    def _fits(self, s: Session) -> bool:
        """Free blocks for all of s's history, less the low-water mark and what sessions on the host
        due back no later than s need to come back (a re-prefill never takes their room)."""
        sooner = sum(self.pager.restore_size(v) for v in self.pager.sessions.values()
                     if v.kv is KVPlace.HOST and v.state is SessionState.IDLE
                     and policies.returns_at(v) <= policies.returns_at(s))
        need = self.pool.blocks_for(_target(s)) - len(s.block_table)
        return need + sooner + self.pager.low_water_blocks <= self.pool.num_free

    def _feed(self, s: Session):
        if s.kv is KVPlace.DROPPED:
            s.kv, self.current = KVPlace.DEVICE, s
            reused = prefix_admission.take_known(self.pager, s, "reprefill") if s.prefix_root else 0
            self.metrics.inc("kv_reprefill_reused_tokens", reused * self.pool.block_size)
        n = min(self.max_tokens, _target(s) - s.num_cached)
        if n > 0:
            s.block_table += self.pool.allocate(max(0, self.pool.blocks_for(s.num_cached + n) - len(s.block_table)))
            started = time.perf_counter()
            self.pager.before_forward([s])
            self.runner.forward([(s, n)])
            if self.runner.is_cuda:     # timed to the end: the lead and the GPU seconds use it
                torch.cuda.synchronize(self.runner.device)
            s.num_cached += n
            self.budget.observe_prefill(n, time.perf_counter() - started)
            self.metrics.inc("kv_reprefill_tokens", n)
            self.metrics.inc("kv_reprefill_s", time.perf_counter() - started)
        if s.num_cached == _target(s):
            self.current = None
            s.prefetched = True
            self.pager.prefix.register(s, may_move=not s.transfers)
            self.metrics.inc("kv_reprefills")


def _target(s: Session) -> int:
    """Tokens whose KV an idle session holds: all but the last (fed with the next prompt)."""
    return len(s.tokens) - 1
