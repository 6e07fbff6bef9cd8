"""Engine: the one thread that owns the model and the KV pool. Each step drains the inbox, asks the
scheduler for a batch, runs it, and sends every new token back to the session's client."""
import itertools
import logging
import os
import queue
import threading
import time
from functools import partial

from djinnd.engine import aborts
from djinnd.engine import commands as cmd
from djinnd.engine.commands import EngineError
from djinnd.engine.runner import Runner
from djinnd.engine.breakpoints import STOPPED, BreakpointRunner
from djinnd.engine.harvest import Harvester
from djinnd.engine.ghost_forward import GhostForwards
from djinnd.engine.mixed_step import can_mix, run_mixed
from djinnd.engine.openmp import release_openmp_threads
from djinnd.engine.pager import Pager
from djinnd.engine.reprefill import Reprefill
from djinnd.engine import request_checks
from djinnd.engine.scheduler import Scheduler
from djinnd.engine.status import engine_status
from djinnd.engine.step_clock import StepClock
from djinnd.engine.weights_export import WeightExports
from djinnd.memory.prefix_cache import root_key
from djinnd.memory.activations import QuotaExceeded, SegmentQuota
from djinnd.memory.swapper import Swapper
from djinnd.metrics import Metrics
from djinnd.session import Phase, Request, Session, SessionState
from libdjinn.protocol import ErrorCode

log = logging.getLogger("djinnd.engine")
MAX_FAULTS_IN_A_ROW = 100   # past this the engine is broken, not unlucky: die so systemd restarts us
STALLED_STEPS = 20          # ~20 ms of steps that change nothing before the loop waits on its inbox


class Engine:
    def __init__(self, loaded, pool, arena, config, device):
        self.loaded, self.pool, self.arena, self.config, self.device = loaded, pool, arena, config, device
        args = loaded.model.args
        self.max_model_len = config.model.max_model_len or args.window
        self.eos = set(args.eos_token_ids)
        self.metrics = Metrics()
        e = config.engine
        self.runner = Runner(loaded.model, pool, device, e.max_num_seqs, self.max_model_len, e.attention, e.cuda_graphs)
        self.runner.decoder.capture()
        if e.mixed_steps:
            self.runner.capture_mixed(e.max_num_batched_tokens)
        self.clock = StepClock(device)            # the device's time of each step, for the step budget
        self.pager = Pager(config.memory.policy, pool, arena, Swapper(pool, arena, device, self.metrics),
                           config.memory.prefetch_lead_ms / 1e3, config.memory.evict_low_water,
                           config.memory.learned_quantile, config.memory.prefix_sharing)
        self.sessions = self.pager.sessions       # one table of sessions, shared with the pager
        self.scheduler = Scheduler(pool, self.pager, config.engine.max_num_seqs,
                                   config.engine.max_num_batched_tokens, config.engine.admission,
                                   config.engine.admission_max_wait_ms / 1e3, config.server.capacity_wait_s,
                                   config.engine.max_step_ms, self.runner.chunk_sizes())
        mb = 2**20
        self.quota = SegmentQuota(int(config.server.max_segment_mb_per_client * mb),
                                  int(config.server.max_segment_mb_per_uid * mb))
        self.reprefill = Reprefill(self.runner, self.pager, self.scheduler.budget, e.max_num_batched_tokens,
                                   config.memory.reprefill)
        self.breaks = BreakpointRunner(self.runner, self.pager, self.metrics, self.quota)
        self.replies: dict[int, cmd.Reply] = {}   # session id -> reply of its request in flight
        self.exports = WeightExports(loaded)
        self.ghost = GhostForwards(self.runner, pool, self.max_model_len,
                                   max(e.max_num_batched_tokens, self.max_model_len), self.quota)
        self.harvester = Harvester(self.runner, pool, self.max_model_len, e.max_num_batched_tokens, self.quota)
        self.inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self.limits = config.server
        self.heartbeat = lambda: None     # the daemon feeds the systemd watchdog from here
        self.on_death = lambda: None      # the daemon exits non-zero when the engine thread stops
        self.dead = False
        self._next_expiry = 0.0
        self._step_faults = 0
        self._stalled_steps = 0               # steps in a row that changed nothing

    # ---- thread ---------------------------------------------------------------------------
    def start(self):
        if self.device.type == "cpu":     # from here on the engine thread runs the model's CPU ops
            release_openmp_threads()
        self._thread = threading.Thread(target=self.run, name="djinn-engine", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self.inbox.put(None)

    def join(self, timeout: float = 30):
        self._thread.join(timeout)

    def run(self):
        """The loop, with one fault boundary around every iteration. A fault in a step fails the
        requests of that step; a fault elsewhere (pager, inbox) fails none. If the loop ever ends
        other than by stop(), every request in flight gets an error and on_death stops the daemon."""
        faults = 0
        try:
            while not self._stop.is_set():
                try:
                    self._iterate()
                    faults = 0
                except Exception:
                    faults += 1
                    log.exception("engine iteration failed (%d in a row)", faults)
                    self.metrics.inc("engine_iteration_errors")
                    if faults >= MAX_FAULTS_IN_A_ROW:
                        raise
        finally:
            self._exit()

    def _iterate(self):
        self.heartbeat()
        self.pager.poll()
        next_prefetch = self.pager.tick()
        if time.monotonic() >= self._next_expiry:
            self._next_expiry = time.monotonic() + 0.1
            aborts.expire(self)
        self._drain(self._wait_s(next_prefetch))
        if self._has_work():
            self._guarded_step()
        else:       # the GPU is idle: rebuild dropped KV due back soon (engine/reprefill.py)
            self.reprefill.step()

    def _wait_s(self, next_prefetch: float | None) -> float:
        """How long to wait for a command: long when idle; a little when work has been stuck for a
        while (a held pause, a full pool under `none`), so waiting work never spins the CPU."""
        if self.pager.busy():
            return 0.001 if not self._has_work() or self._stalled_steps >= STALLED_STEPS else 0
        if not self._has_work():
            due = [t for t in (next_prefetch, self.reprefill.due_in()) if t is not None]
            return min(due + [0.5])
        return min(next_prefetch or 0.05, 0.05) if self._stalled_steps >= STALLED_STEPS else 0

    def _guarded_step(self):
        """One step; a fault fails the requests of that step, and a queue head whose admission
        fails twice in a row."""
        before = self._progress()
        try:
            self.step()
            self._step_faults = 0
        except Exception as e:     # a bug must never stop the engine thread
            log.exception("engine step failed")
            self.metrics.inc("engine_step_errors")
            self._fail_running(e)
            self._step_faults += 1
            if self._step_faults >= 2 and self.scheduler.waiting:
                self._abort(self.scheduler.waiting[0], cmd.Failed(
                    ErrorCode.INTERNAL, f"admission failed: {type(e).__name__}: {e}"))
        self._stalled_steps = self._stalled_steps + 1 if self._progress() == before else 0

    def _progress(self) -> tuple:
        return (len(self.scheduler.waiting), len(self.scheduler.running), self.pool.num_free,
                len(self.pager.swapper.in_flight), self.metrics.counters.get("tokens_generated"),
                self.metrics.counters.get("breakpoint_pauses"))

    def _exit(self):
        for s in self.sessions.values():      # no activation segment outlives the engine
            self.breaks.discard(s)
        self.runner.interventions.close_all()
        self.harvester.close()
        if self._stop.is_set():
            return
        self.dead = True
        log.critical("the engine thread stopped; the daemon exits")
        for reply in list(self.replies.values()):
            reply(cmd.Failed(ErrorCode.UNAVAILABLE, "the daemon's engine stopped; it is restarting"))
        self.replies.clear()
        self.on_death()

    def _has_work(self) -> bool:
        return (self.scheduler.has_work() or bool(self.breaks.resumed(self.scheduler.running))
                or self.runner.in_flight is not None)

    def _drain(self, timeout: float):
        try:
            item = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
            while item is not None:
                self._handle(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    # ---- commands -------------------------------------------------------------------------
    def _handle(self, c):
        try:
            {
                cmd.OpenSession: self._open, cmd.CloseSession: self._close,
                cmd.Generate: self._generate, cmd.SetPhase: self._set_phase,
                cmd.ReleaseOwner: self._release_owner, cmd.Status: self._status,
                cmd.Resume: self._resume, cmd.Cancel: self._cancel,
                cmd.AttachWeights: self._attach_weights, cmd.DetachWeights: self._detach_weights,
                cmd.GhostForward: self._ghost_forward, cmd.ModelConfig: self._model_config,
                cmd.Harvest: self._harvest,
            }[type(c)](c)
        except EngineError as e:
            c.reply(cmd.Failed(e.code, e.message))
        except Exception as e:  # a bug must cost one request, never the daemon
            log.exception("command %s failed", type(c).__name__)
            if hasattr(c, "reply"):
                c.reply(cmd.Failed(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))

    def _owned(self, owner: int, session_id: int) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise EngineError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id}")
        if s.owner != owner:
            raise EngineError(ErrorCode.NOT_OWNER, f"session {session_id} belongs to another client")
        return s

    def _open(self, c: cmd.OpenSession):
        s = Session(next(self._ids), c.owner, c.owner_pid)
        self.quota.uid_of[c.owner] = _or(c.owner_uid, os.getuid())
        s.prefix_root = root_key(self.pager.prefix.scope, _or(c.owner_uid, os.getuid()), _or(c.owner_gid, os.getgid()))
        self.sessions[s.id] = s
        self.metrics.inc("sessions_opened")
        c.reply(cmd.Result({"session": s.id}))

    def _close(self, c: cmd.CloseSession):
        self._drop(self._owned(c.owner, c.session), "session closed")
        c.reply(cmd.Result({"session": c.session, "closed": True}))

    def _drop(self, s: Session, why: str):
        reply = self.replies.pop(s.id, None)
        if reply:
            reply(cmd.Failed(ErrorCode.UNKNOWN_SESSION, f"session {s.id}: {why}"))
        self.scheduler.drop(s)
        self.breaks.discard(s)
        self.runner.forget(s.id)
        self.runner.interventions.close(s.id)
        s.request = None          # a decode step still in flight drops its token for this session
        self.metrics.inc("sessions_closed")

    def _release_owner(self, c: cmd.ReleaseOwner):
        self._release_weights(c.owner)
        gone = [s for s in self.sessions.values() if s.owner == c.owner]
        for s in gone:
            self._drop(s, "client disconnected")
        if gone:
            self.metrics.inc("sessions_released_on_disconnect", len(gone))
        self.quota.uid_of.pop(c.owner, None)

    def _set_phase(self, c: cmd.SetPhase):
        s = self._owned(c.owner, c.session)
        try:
            phase = Phase(c.phase)
        except ValueError:
            raise EngineError(ErrorCode.BAD_REQUEST, f"unknown phase {c.phase!r}; use ACTIVE or IO_WAIT")
        if c.expected_s is not None and not 0 <= c.expected_s < float("inf"):
            raise EngineError(ErrorCode.BAD_REQUEST, f"expected_s must be a finite number >= 0, got {c.expected_s}")
        if c.tool is not None and not 0 < len(c.tool) <= 128:
            raise EngineError(ErrorCode.BAD_REQUEST, f"tool must be a name of 1 to 128 characters, got {len(c.tool)}")
        self.pager.on_phase(s, phase, c.expected_s, c.tool)
        c.reply(cmd.Result({"session": s.id, "phase": s.phase.value}))

    def _generate(self, c: cmd.Generate):
        s = self._owned(c.owner, c.session)
        keep = request_checks.check_generate(self, s, c)
        captures = self._start_interventions(s, c, keep)
        self.pager.truncate(s, keep)
        s.tokens.extend(c.prompt_ids)
        s.request = Request(c.params, len(c.prompt_ids), num_cached=s.num_cached,
                            kv_at_arrival=request_checks.kv_state(s))
        s.prefetched = False
        self.replies[s.id] = c.reply
        if captures:
            c.reply(captures)
        self.scheduler.add(s)
        self.metrics.inc("requests")

    def _start_interventions(self, s: Session, c: cmd.Generate, keep: int):
        """Steering vectors and the capture segment of the request (engine/interventions.py). Such a
        session, or one with breakpoints, leaves prefix sharing for good: steered or edited KV must
        never reach another session, and a capture or a pause needs every prompt token computed."""
        try:
            captures = self.runner.interventions.start(s.id, c.interventions, keep, len(c.prompt_ids),
                                                       c.params.max_new_tokens, (self.quota, s.owner))
        except MemoryError as e:
            raise EngineError(ErrorCode.NO_CAPACITY, f"session {s.id}: capture: {e}") from None
        except QuotaExceeded as e:
            raise EngineError(ErrorCode.LIMIT, f"session {s.id}: capture: {e}") from None
        if self.runner.interventions.of(s.id) is not None or c.params.breakpoints:
            s.prefix_root = None
        return captures

    def _resume(self, c: cmd.Resume):
        s = self._owned(c.owner, c.session)
        self.breaks.resume(s, c.shape, c.dtype)
        c.reply(cmd.Result({"session": s.id, "resumed": True}))

    def _cancel(self, c: cmd.Cancel):
        cancelled = aborts.cancel(self, self._owned(c.owner, c.session))
        c.reply(cmd.Result({"session": c.session, "cancelled": cancelled}))

    def _abort(self, s: Session, event):
        aborts.abort(self, s, event)

    # ---- stepping -------------------------------------------------------------------------
    def step(self):
        started = self.clock.mark()           # decoding sessions wait for the whole step: the budget times it all
        for s in self.scheduler.running:      # blocks filled last step become known before admission
            self.pager.prefix.register(s, may_move=False)
        resumed = self.breaks.resumed(self.scheduler.running)
        for s in resumed:
            self.runner.batch.remove(s.id)    # it runs eagerly: its decode row would go stale
        plan = self.scheduler.schedule()
        self._refuse(self.scheduler.refused)
        stepped = [s for s in plan.decode + [s for s, _ in plan.prefill] if self.breaks.is_stepped(s)]
        for s in stepped:                     # each on its own, so a pause never holds the batch
            self.runner.batch.remove(s.id)
        decode = [s for s in plan.decode if s not in stepped]
        prefill = [(s, n) for s, n in plan.prefill if s not in stepped]
        if not (decode or prefill or stepped or resumed):
            time.sleep(0.001)  # everything waits for blocks; let the inbox bring a close or release
        self._batched(decode, prefill, started)
        # Breakpoint forwards go after the batch's step is launched: the host launches their eager
        # kernels while the GPU runs the batch, instead of the batch waiting for them.
        for s in resumed:
            self._on_its_own(s, self.breaks.proceed)
        for s in stepped:
            self._on_its_own(s, self.breaks.start)

    def _batched(self, decode: list[Session], prefill: list[tuple[Session, int]], step_started):
        """The batch's forwards of this step: mixed, or prefill then decode. The budget learns what
        they cost on the device (engine/step_clock.py) and at which prefixes the chunks were fed."""
        budget, clock = self.scheduler.budget, self.clock
        timed = budget.max_step_s > 0     # steps beside decoding rows matter only to a budget; prefills to re-prefill too
        fed, chunks = sum(n for _, n in prefill), [(s.num_cached, n) for s, n in prefill]
        if prefill and decode and self.config.engine.mixed_steps and can_mix(self.runner, decode, prefill):
            pipelined = self._pipelined(decode)
            self._forward("mixed", decode + [s for s, _ in prefill],
                          lambda: run_mixed(self.runner, decode, prefill, pipelined), len(decode))
            self.metrics.inc("prompt_tokens", fed)
            if timed:
                clock.span(step_started, clock.mark(), partial(self._observe_step, chunks))
            clock.poll()
            return
        if prefill:
            self._forward("prefill", [s for s, _ in prefill], lambda: zip(
                [s for s, _ in prefill], self.runner.prefill(prefill)), fed)
            prefilled = clock.mark()
            clock.span(step_started, prefilled, partial(budget.observe_prefill, fed))
        if decode or self.runner.in_flight:
            pipelined = self._pipelined(decode)
            self._forward("decode", decode, lambda: self.runner.decode(decode, pipelined), len(decode))
            if decode and timed:
                decoded = clock.mark()
                clock.span(prefilled if prefill else step_started, decoded, budget.observe_decode)
                if prefill:
                    clock.span(step_started, decoded, partial(self._observe_step, chunks))
        clock.poll()

    def _pipelined(self, decode: list[Session]) -> bool:
        """Hand a decode step's tokens out a step late, while the GPU runs the next one. Not on CPU:
        there a step is done when launched, and holding its tokens back would only delay each token
        by a step and compute one more step at each request's end."""
        return self.runner.is_cuda and not any(s.request.params.has_decode_breakpoints for s in decode)

    def _on_its_own(self, s: Session, run):
        """A forward of s alone (breakpoints); a refusal (a segment quota) ends its request, not the step."""
        try:
            self._after_forward(s, run(s))
        except EngineError as e:
            self._abort(s, cmd.Failed(e.code, e.message))

    def _observe_step(self, chunks: list[tuple[int, int]], seconds: float):
        """A step beside decoding rows, timed on the device: the budget learns from it, and its
        time joins the latency report (what decoding sessions waited, step by step)."""
        self.scheduler.budget.observe_step(chunks, seconds)
        self.metrics.observe_ms("step_beside_decode", seconds * 1e3)

    def _forward(self, kind: str, sessions: list[Session], run, num_tokens: int):
        """Run one forward; a failure ends these sessions' requests with an error, and only theirs."""
        started = time.perf_counter()
        for s in sessions:
            if not s.request.started:
                s.request.started = True
                self.metrics.inc("cached_tokens_reused", s.num_cached)
                self.metrics.observe_ms("queue_wait", (time.monotonic() - s.request.queued_at) * 1e3)
        self.pager.before_forward(sessions)
        try:
            for s, token in run():    # as they come: a mixed step hands out the step before it first
                if token is not None and s.request is not None:   # a request may end on an earlier token here
                    self._append(s, token)
        except Exception as e:
            log.exception("%s forward failed", kind)
            for s in sessions:
                if s.request is not None:
                    self._abort(s, cmd.Failed(ErrorCode.INTERNAL, f"forward failed: {e}"))
            return
        self.metrics.inc(f"{kind}_s", time.perf_counter() - started)
        self.metrics.inc(f"{kind}_steps")
        self.metrics.inc("prompt_tokens" if kind == "prefill" else "decode_tokens", num_tokens)

    def _after_forward(self, s: Session, token: int | None):
        if token == STOPPED:     # stop_at_layer: no token; the history is left as it was (no KV past the layer)
            aborts.abort(self, s, cmd.Done([], "stop_at_layer", s.request.num_prompt_tokens, s.request.num_cached))
        elif token is not None:
            self._append(s, token)
        elif s.state is SessionState.PAUSED and s.paused.resumed_at is None:
            p = s.paused
            self.replies[s.id](cmd.Paused(s.id, p.layer, p.step, p.segment.descriptor()))
            self.metrics.inc("breakpoint_pauses")

    def _append(self, s: Session, token: int):
        req = s.request
        if not req.output:
            ttft = (time.monotonic() - req.queued_at) * 1e3
            self.metrics.observe_ms("ttft", ttft)
            self.metrics.observe_ms(f"ttft_{req.kv_at_arrival}", ttft)
        req.output.append(token)
        s.tokens.append(token)
        self.metrics.inc("tokens_generated")
        self.replies[s.id](cmd.Token(token))
        if token in self.eos and not req.params.ignore_eos:
            self._end(s, "stop")
        elif len(req.output) >= req.params.max_new_tokens:
            self._end(s, "length")

    def _end(self, s: Session, reason: str | None, failure: cmd.Failed | None = None):
        req = s.request
        self.scheduler.finish(s)
        s.last_used = time.monotonic()
        self.runner.forget(s.id)
        s.request = None
        reply = self.replies.pop(s.id)
        reply(failure or cmd.Done(req.output, reason, req.num_prompt_tokens, req.num_cached))

    def _fail_running(self, error: Exception):
        """After a failed step, end the batch's requests with an error rather than retry forever."""
        for s in [s for s in self.scheduler.running if s.state is SessionState.RUNNING and s.request]:
            self._abort(s, cmd.Failed(ErrorCode.INTERNAL, f"step failed: {type(error).__name__}: {error}"))

    def _refuse(self, refused: list):
        for s, why in refused:
            s.cut_tokens(len(s.tokens) - s.request.num_prompt_tokens)
            s.request = None
            s.change_state(SessionState.IDLE)
            self.replies.pop(s.id)(cmd.Failed(ErrorCode.NO_CAPACITY, f"session {s.id}: {why}"))
            self.metrics.inc("requests_refused")
        refused.clear()

    # ---- status ---------------------------------------------------------------------------
    def _status(self, c: cmd.Status):
        self.pager.poll()       # copies finished since the last step show where they landed
        if c.report == "swaps":
            c.reply(cmd.Result(self.metrics.swap_report(with_samples=True)))
        elif c.report == "timeline":
            c.reply(cmd.Result({"timeline": list(self.metrics.timeline)}))
        else:
            c.reply(cmd.Result(engine_status(self)))

    # ---- weights export and ghost forwards (engine/weights_export.py, engine/ghost_forward.py) ----
    def _attach_weights(self, c: cmd.AttachWeights):
        c.reply(cmd.Result(self.exports.attach(c.owner, c.owner_pid, c.writable)))
        self.metrics.inc("weights_attaches")

    def _detach_weights(self, c: cmd.DetachWeights):
        c.reply(cmd.Result({"detached": self.exports.detach(c.owner)}))

    def _ghost_forward(self, c: cmd.GhostForward):
        self.quota.uid_of.setdefault(c.owner, _or(c.owner_uid, os.getuid()))
        c.reply(cmd.Result({"logits": self.ghost.run(c.owner, c.input_ids)}))
        self.metrics.inc("ghost_forwards")

    def _harvest(self, c: cmd.Harvest):
        c.reply(cmd.Result(self.harvester.run(c.owner, c.prompts, c.layers)))
        self.metrics.inc("harvest_tokens", sum(len(p) for p in c.prompts))

    def _model_config(self, c: cmd.ModelConfig):
        c.reply(cmd.Result({"config": self.loaded.model.args.to_hf(), "label": self.loaded.label,
                            "max_harvest_tokens": self.harvester.max_tokens}))

    def _release_weights(self, owner: int):
        """A connection closed: its attachment and its last forward's logits go with it."""
        self.exports.detach(owner)
        self.ghost.release(owner)
        self.harvester.release(owner)

    def close_weights(self):
        """At shutdown: unlink the weights segment and any logits segments."""
        self.ghost.close()
        self.exports.close()


def _or(value, default):
    return default if value is None else value
