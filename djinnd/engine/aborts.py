"""Ending requests early: cancel, pause and queue timeouts, the per-client pause cap. A request that
does not finish leaves its session's history as it was before it, so a retry starts clean."""
import time

from djinnd.engine import commands as cmd
from djinnd.session import KVPlace, Session, SessionState
from libdjinn.protocol import ErrorCode


def abort(engine, s: Session, event):
    """End s's request before it finished with `event` (Failed, or Done for a cancel)."""
    kept = len(s.tokens) - s.request.num_prompt_tokens - len(s.request.output)
    s.cut_tokens(kept)
    s.num_cached = min(s.num_cached, kept)
    if s.kv is KVPlace.HOST:
        _drop_host_kv(engine, s)
    if s.state is SessionState.WAITING:
        engine.scheduler.waiting.remove(s)
        s.change_state(SessionState.IDLE)
        s.request = None
        engine.replies.pop(s.id)(event)
        return
    if s.state is SessionState.PAUSED:
        engine.breaks.discard(s)
        s.change_state(SessionState.RUNNING)
    engine._end(s, None, event)


def _drop_host_kv(engine, s: Session):
    """Swapped KV of an aborted request holds its whole reservation, which no longer matches the
    shorter history; drop it (the next request prefills the history) rather than restore it."""
    engine.pager.forget_keys(s)       # and its claims on shared blocks' host copies
    if s.transfers:
        s.transfers[-1].free_host += s.host_runs
    else:
        engine.arena.free(s.host_runs)
    s.host_runs, s.kv, s.num_cached = [], KVPlace.DROPPED, 0


def cancel(engine, s: Session) -> bool:
    if s.request is None:
        return False
    req = s.request
    abort(engine, s, cmd.Done(list(req.output), "cancelled", req.num_prompt_tokens, req.num_cached))
    engine.metrics.inc("requests_cancelled")
    return True


def expire(engine):
    """Pauses held past pause_timeout_s and requests queued past queue_timeout_s end with TIMEOUT;
    a resumed pause whose KV cannot come back within capacity_wait_s ends with NO_CAPACITY. So no
    client can hold a batch slot, KV room or the queue forever."""
    pause_s, queue_s, now = engine.limits.pause_timeout_s, engine.limits.queue_timeout_s, time.monotonic()
    wait_s = engine.limits.capacity_wait_s
    for s in [s for s in engine.scheduler.running if s.state is SessionState.PAUSED]:
        p, held = s.paused, time.perf_counter() - s.paused.paused_at
        if p.resumed_at is None and held > pause_s:
            abort(engine, s, cmd.Failed(ErrorCode.TIMEOUT, f"session {s.id}: paused at layer {p.layer} "
                                        f"for over {pause_s:g} s without resume (server.pause_timeout_s)"))
            engine.metrics.inc("pauses_timed_out")
        elif p.resumed_at is not None and time.perf_counter() - p.resumed_at > wait_s:
            abort(engine, s, cmd.Failed(ErrorCode.NO_CAPACITY, f"session {s.id}: resumed at layer {p.layer}, but "
                                        f"its KV could not come back to the device within {wait_s:g} s "
                                        "(server.capacity_wait_s): other sessions hold the pool and the host "
                                        "arena; its history is kept up to this request, retry later"))
            engine.metrics.inc("resumes_refused")
    for s in [s for s in engine.scheduler.waiting if now - s.request.queued_at > queue_s]:
        abort(engine, s, cmd.Failed(ErrorCode.TIMEOUT, f"session {s.id}: waited over {queue_s:g} s for KV "
                                    "blocks (server.queue_timeout_s); the pool is held by other sessions"))
        engine.metrics.inc("requests_timed_out")


def pause_limit_reached(engine, owner: int) -> str | None:
    """Requests with breakpoints in flight are capped per connection and in all, so paused sessions
    never hold more than half the batch rows (max_num_seqs)."""
    cap = engine.limits.max_paused_per_client
    tracing = [s.owner for s in engine.sessions.values() if s.request is not None and s.request.params.breakpoints]
    if tracing.count(owner) >= cap:
        return (f"this connection already has {cap} requests with breakpoints in flight "
                "(server.max_paused_per_client); resume or cancel one first")
    total = max(1, min(engine.limits.max_paused, engine.config.engine.max_num_seqs // 2))
    if len(tracing) >= total:
        return (f"{total} requests with breakpoints are in flight across all clients (server.max_paused, "
                "at most half of engine.max_num_seqs); try again when one ends")
    return None
