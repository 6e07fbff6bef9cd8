"""Paging policies: which sessions give up device KV, when, and how; and the learned tool durations
the semantic policy prefetches by.

semantic   an IO_WAIT session keeps its KV until the room is wanted (admission, a prefetch, or free
           blocks under the low-water mark); victims are IO_WAIT sessions whose expected return is
           furthest away, then idle ones by LRU; KV comes back ahead of the expected return (the
           agent's `expected_s`, else the learned duration of that tool or session), or on ACTIVE
lru        reactive, what vLLM-style engines do: evict the least recently used idle session only
           when the pool is full; restore on its next request
recompute  like lru, but drop the KV and prefill the history again on the next request
none       no virtualization: work that cannot fit is refused with an error naming the shortfall

semantic and lru have three tiers: device, host arena, dropped. When the arena is full, the KV
cheapest to lose is dropped (the victim's own, or another session's on the host) rather than the
request refused; its next request prefills the history again (`drop_order`).
"""
import math
import time
from collections import OrderedDict, deque

from djinnd.session import KVPlace, Phase, Session, SessionState

POLICIES = ("semantic", "lru", "recompute", "none")


def prefetches(policy: str) -> bool:
    return policy == "semantic"


def evicts_by_copy(policy: str) -> bool:
    """True: swap KV to the host arena. False (recompute): drop it."""
    return policy != "recompute"


def evictable(s: Session) -> bool:
    """Not in the batch, KV on the device, no copy in flight. A queued session's KV may go too:
    it comes back when the session is admitted."""
    return (s.state is not SessionState.RUNNING and s.kv is KVPlace.DEVICE and bool(s.block_table)
            and not s.transfers)


def returns_at(s: Session) -> float:
    """When an IO_WAIT session is expected back (monotonic s); unknown counts as never."""
    return math.inf if s.expected_back is None else s.expected_back


def eviction_order(policy: str, sessions, exclude: Session | None = None) -> list[Session]:
    """Evictable sessions, first to go first. Queued sessions always go last."""
    if policy == "none":
        return []
    candidates = [s for s in sessions if evictable(s) and s is not exclude
                  and not (policy == "recompute" and s.state is SessionState.PAUSED)]  # mid-forward KV cannot be rebuilt
    queued = lambda s: s.state is SessionState.WAITING  # noqa: E731
    if policy == "semantic":
        return sorted(candidates, key=lambda s: (queued(s), *semantic_rank(s, time.monotonic())))
    return sorted(candidates, key=lambda s: (queued(s), s.last_used))


def semantic_rank(s: Session, now: float) -> tuple:
    """In a tool call, latest return first; then idle sessions by LRU; last, those whose prefetch is
    due: they are back within the prefetch lead, as good as active."""
    if s.phase is not Phase.IO_WAIT:
        return (1, s.last_used)
    if s.prefetch_at is not None and s.prefetch_at <= now:
        return (2, s.prefetch_at)
    return (0, -returns_at(s))


def take_until(ordered: list[Session], num_blocks: int) -> list[Session]:
    chosen, freed = [], 0
    for s in ordered:
        if freed >= num_blocks:
            break
        chosen.append(s)
        freed += len(s.block_table)
    return chosen


def victims(policy: str, sessions, num_blocks: int, exclude: Session | None = None) -> list[Session]:
    """Sessions to evict, in order, until num_blocks device blocks would be free."""
    return take_until(eviction_order(policy, sessions, exclude), num_blocks)


def prefetch_victims(sessions, s: Session, num_blocks: int, due: float) -> list[Session]:
    """Room for the prefetch of s, due back at `due`: only sessions due back later, or idle ones,
    never queued work; nothing unless they free enough."""
    later = [v for v in eviction_order("semantic", sessions, exclude=s) if v.state is not SessionState.WAITING
             and (returns_at(v) > due if v.phase is Phase.IO_WAIT else v.state is SessionState.IDLE)]
    chosen = take_until(later, num_blocks)
    return chosen if sum(len(v.block_table) for v in chosen) >= num_blocks else []


def lazy_victims(sessions, num_blocks: int, not_before: float) -> list[Session]:
    """Background eviction under the low-water mark: IO_WAIT sessions not due before not_before."""
    far = [s for s in eviction_order("semantic", sessions)
           if s.phase is Phase.IO_WAIT and s.state is SessionState.IDLE and returns_at(s) > not_before]
    return take_until(far, num_blocks)


def droppable_from_host(s: Session) -> bool:
    """Idle with its KV on the host and no copy in flight: dropping it frees arena blocks now.
    Queued sessions are about to come back, paused ones cannot be rebuilt mid-forward."""
    return s.kv is KVPlace.HOST and s.state is SessionState.IDLE and not s.transfers and bool(s.host_runs)


def drop_cost(s: Session, now: float) -> tuple:
    """What losing s's KV costs: its tokens to prefill again per second before it is expected back,
    then its length, so the furthest return and the shortest context are cheapest. A return not
    known (idle, or a tool call of no known duration) is expected in as long again as the session
    has been away: one that has just finished a turn is about to come back."""
    back = returns_at(s) if s.phase is Phase.IO_WAIT else math.inf
    slack = back - now if back < math.inf else now - (s.io_wait_since or s.last_used)
    return (len(s.tokens) / slack if slack > 0 else math.inf, len(s.tokens))


def drop_order(policy: str, candidates, now: float) -> list[Session]:
    """Sessions whose KV to drop, cheapest to lose first. lru knows no returns: least recently used."""
    if policy == "semantic":
        return sorted(candidates, key=lambda s: drop_cost(s, now))
    return sorted(candidates, key=lambda s: s.last_used)


class ToolDurations:
    """Learned tool-call durations: recent IO_WAIT -> ACTIVE intervals per tool name and per session.
    The estimate is a low quantile of the recent ones, so most prefetches land before the return."""

    def __init__(self, quantile: float, keep: int = 32, min_samples: int = 2, max_keys: int = 4096):
        self.quantile, self.keep, self.min_samples, self.max_keys = quantile, keep, min_samples, max_keys
        self.samples: OrderedDict = OrderedDict()   # ("tool", name) or ("session", id) -> deque of seconds

    def observe(self, session_id: int, tool: str | None, seconds: float):
        for key in ([("tool", tool)] if tool else []) + [("session", session_id)]:
            self.samples.setdefault(key, deque(maxlen=self.keep)).append(seconds)
            self.samples.move_to_end(key)
        while len(self.samples) > self.max_keys:     # a client inventing tool names costs bounded memory
            self.samples.popitem(last=False)

    def estimate(self, session_id: int, tool: str | None) -> float | None:
        """Seconds the call is expected to take: that tool's history first, else that session's."""
        for key in ([("tool", tool)] if tool else []) + [("session", session_id)]:
            q = sorted(self.samples.get(key, ()))
            if len(q) >= self.min_samples:
                return q[min(len(q) - 1, int(self.quantile * len(q)))]
        return None

    def forget(self, session_id: int):
        self.samples.pop(("session", session_id), None)
