"""Paging policies: which sessions give up device KV, when, and how.

semantic   evict on IO_WAIT at once, prefetch on ACTIVE or ahead of the expected return; under
           pressure take IO_WAIT sessions first, then the least recently used
lru        reactive, what vLLM-style engines do: evict the least recently used idle session only
           when the pool is full; restore on its next request
recompute  like lru, but drop the KV and prefill the history again on the next request
none       no virtualization: work that cannot fit is refused with an error naming the shortfall
"""
from djinnd.session import KVPlace, Phase, Session, SessionState

POLICIES = ("semantic", "lru", "recompute", "none")


def evicts_on_signal(policy: str) -> bool:
    return policy == "semantic"


def evicts_by_copy(policy: str) -> bool:
    """True: swap KV to the host arena. False (recompute): drop it."""
    return policy != "recompute"


def evictable(s: Session) -> bool:
    """Not in the batch, KV on the device, no copy in flight. A queued session's KV may go too:
    it comes back when the session is admitted."""
    return (s.state is not SessionState.RUNNING and s.kv is KVPlace.DEVICE and bool(s.block_table)
            and not s.transfers)


def victims(policy: str, sessions, num_blocks: int, exclude: Session | None = None) -> list[Session]:
    """Sessions to evict, in order, until num_blocks device blocks would be free."""
    if policy == "none":
        return []
    candidates = [s for s in sessions if evictable(s) and s is not exclude
                  and not (policy == "recompute" and s.state is SessionState.PAUSED)]  # mid-forward KV cannot be rebuilt
    queued_last = lambda s: s.state is SessionState.WAITING  # noqa: E731
    if policy == "semantic":   # agents in a tool call first, then by recency
        candidates.sort(key=lambda s: (queued_last(s), s.phase is not Phase.IO_WAIT, s.last_used))
    else:
        candidates.sort(key=lambda s: (queued_last(s), s.last_used))
    chosen, freed = [], 0
    for s in candidates:
        if freed >= num_blocks:
            break
        chosen.append(s)
        freed += len(s.block_table)
    return chosen
