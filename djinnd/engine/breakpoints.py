"""Breakpoints: a forward that pauses after chosen decoder layers, hands the hidden states to the
client through shared memory, and continues from them when the client resumes.

A session with a breakpoint in this step runs its forward on its own, one segment of layers at a
time, so the batch never waits for a client. Its KV stays in the pool while paused (and may be
paged like an idle session's); metadata is rebuilt at resume, since paging may move its blocks.
"""
import time
from dataclasses import dataclass, field

from djinnd.engine.commands import EngineError
from djinnd.memory.activations import DTYPE_NAMES, ActivationSegment, QuotaExceeded, SegmentError
from djinnd.session import KVPlace, Session, SessionState
from libdjinn.protocol import ErrorCode

STOPPED = -1    # instead of a token: the forward ended at the request's stop_at_layer, nothing sampled


@dataclass
class PausedForward:
    layer: int                 # the decoder layer whose output the client holds
    pending: list[int]         # breakpoint layers still ahead in this forward
    segment: ActivationSegment
    step: int
    resumed_at: float | None = None
    hidden: object = None      # copied out of the segment at resume
    paused_at: float = field(default_factory=time.perf_counter)


class BreakpointRunner:
    def __init__(self, runner, pager, metrics, quota=None):
        self.runner, self.pager, self.metrics = runner, pager, metrics
        self.quota = quota                      # activation segments count against their client's
        self.num_layers = runner.model.args.num_layers

    def layers_now(self, s: Session) -> list[int]:
        return s.request.params.breakpoint_layers(len(s.request.output))

    def is_stepped(self, s: Session) -> bool:
        """Runs this step on its own: it pauses in it, or its forward ends early (stop_at_layer)."""
        return bool(self.layers_now(s)) or self._stop_at(s) is not None

    def start(self, s: Session) -> int | None:
        """Run s's forward up to its first breakpoint. None: paused; STOPPED; else the sampled token."""
        return self._advance(s, 0, None, self.layers_now(s), step=len(s.request.output))

    def _stop_at(self, s: Session) -> int | None:
        a = self.runner.interventions.of(s.id)
        return None if a is None else a.stop_at_layer

    def _advance(self, s: Session, start: int, hidden, pending: list[int], step: int) -> int | None:
        stop_at = self._stop_at(s)
        stop = pending[0] + 1 if pending else None if stop_at is None else stop_at + 1
        if pending and self.quota:              # refused before the forward, not after it
            try:
                self.quota.require(s.owner, s.num_new_tokens * self.runner.model.args.hidden_size * 4)
            except QuotaExceeded as e:
                raise EngineError(ErrorCode.LIMIT, f"breakpoint at layer {pending[0]}: {e}") from None
        self.pager.before_forward([s])
        h, meta = self.runner.forward([(s, s.num_new_tokens)], start, stop, hidden)
        if not pending:
            return STOPPED if stop_at is not None else self.runner.sample_next([s], h, meta)[0]
        copied = time.perf_counter()
        segment = ActivationSegment(h.shape, h.dtype, self.quota, s.owner, share="edit")
        segment.write(h)                        # device -> shared memory: the handoff
        self.metrics.observe_ms("breakpoint_handoff_out", (time.perf_counter() - copied) * 1e3)
        s.paused = PausedForward(pending[0], pending[1:], segment, step)
        s.change_state(SessionState.PAUSED)
        return None

    def resume(self, s: Session, shape, dtype):
        """Mark s to continue; a hidden tensor of the wrong shape or dtype keeps it paused."""
        p = s.paused
        if s.state is not SessionState.PAUSED or p.resumed_at is not None:
            raise EngineError(ErrorCode.BAD_REQUEST, f"session {s.id} is not paused")
        want_shape, want_dtype = list(p.segment.shape), DTYPE_NAMES[p.segment.dtype]
        if shape is not None and list(shape) != want_shape:
            raise EngineError(ErrorCode.BAD_REQUEST, f"resume: hidden states of shape {list(shape)}; "
                                  f"session {s.id} is paused with shape {want_shape}")
        if dtype is not None and dtype != want_dtype:
            raise EngineError(ErrorCode.BAD_REQUEST, f"resume: hidden states of dtype {dtype}; "
                                  f"session {s.id} is paused with {want_dtype}")
        try:
            p.hidden = p.segment.read()        # copied now: the client can no longer change it under us
        except SegmentError as e:
            raise EngineError(ErrorCode.BAD_REQUEST, f"resume: {e}; session {s.id} stays paused") from None
        if not bool(p.hidden.isfinite().all()):   # NaN/inf would reach the KV cache, and from there attention
            p.hidden = None
            raise EngineError(ErrorCode.BAD_REQUEST, f"resume: the hidden states hold NaN or inf; session {s.id} "
                              "stays paused (write finite values and resume again)")
        p.resumed_at = time.perf_counter()

    def resumed(self, sessions) -> list[Session]:
        return [s for s in sessions if s.state is SessionState.PAUSED and s.paused.resumed_at is not None]

    def proceed(self, s: Session) -> int | None:
        """Continue a resumed forward; None while it waits for its KV or pauses again."""
        if s.kv is KVPlace.HOST and not self._bring_back(s):
            return None
        p = s.paused
        hidden = p.hidden.to(self.runner.device)   # copied out of shared memory at resume
        self.metrics.observe_ms("breakpoint_resume", (time.perf_counter() - p.resumed_at) * 1e3)
        self.discard(s)
        s.change_state(SessionState.RUNNING)
        return self._advance(s, p.layer + 1, hidden, p.pending, p.step)

    def _bring_back(self, s: Session) -> bool:
        n = self.pager.restore_size(s)          # its shared blocks still held come back as they are
        if s.transfers or not self.pager.pool.can_allocate(n):
            self.pager.make_room(n - self.pager.pool.num_free, s)
            return False
        return self.pager.restore(s, "restore")

    def discard(self, s: Session):
        if s.paused is not None:
            s.paused.segment.close()
            s.paused = None


def check_layers(breakpoints: list, num_layers: int) -> str | None:
    bad = [layer for layer, _ in breakpoints if not 0 <= layer < num_layers]
    return f"breakpoint layers {bad} out of range: the model has layers 0..{num_layers - 1}" if bad else None

