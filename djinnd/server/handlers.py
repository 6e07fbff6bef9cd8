"""One client connection: validated requests in, engine commands out, engine events back as frames.

Runs on the server's event loop; engine events arrive from the engine thread through `relay`.
Ownership is checked by the engine (a session remembers the connection that opened it).
"""
import math
import os
import socket
from collections import Counter, deque

from djinnd.engine import commands as cmd
from djinnd.server import intervention_fields
from djinnd.server.text import ChatState, Detokenizer, chat_record_reply, chat_turn, check_messages
from djinnd.session import SamplingParams
from libdjinn.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError, encode_frame, error_reply, take_fds


FINAL = ("result", "done", "error")
MAX_NEW_TOKENS = 1 << 20
MAX_BREAKPOINT_ITEMS = 4096
MAX_EXPECTED_S = 1e7
REPORTS = ("status", "swaps", "timeline")
MAX_REPORTS_IN_FLIGHT = 8     # reports are large: a client pipelining them must read them first


class Connection:
    def __init__(self, conn_id: int, pid: int, writer, inbox, loaded, loop, uid: int | None = None, limits=None,
                 gid: int | None = None):
        self.id, self.pid, self.writer, self.inbox, self.loop = conn_id, pid, writer, inbox, loop
        self.uid, self.gid = uid, gid           # the peer's, by SO_PEERCRED: who its sessions share KV with
        self.tokenizer, self.label = loaded.tokenizer, loaded.label
        self.tokenizer_dir = loaded.tokenizer_dir
        self.args = loaded.model.args           # the model's shape, to check steering vectors and layers
        self.limits = limits                    # config.server: per-client caps
        self.sees_all = uid in (0, os.getuid())  # status shows other clients' sessions only to these
        self.greeted = False
        self.chats: dict[int, ChatState] = {}
        self.sessions: set[int] = set()         # opened here and not closed
        self.opening = 0                        # open_session requests in flight
        self.pending: Counter = Counter()       # request id -> requests awaiting their final reply
        self.reports = 0                        # status/swaps/timeline awaiting their reply
        self.on_overflow = None                 # called once the client leaves too much unread
        self.behind_fds: deque = deque()        # (frame, fds) waiting to go out in order, fds first
        self.raw = None                         # our copy of the socket, for sendmsg
        self.retry = None                       # the timer of the next _send_with_fds, if one is set

    def send(self, message: dict, counted: bool = True):
        """counted: the message answers a request handle() counted (False: refused before that)."""
        if counted and message.get("type") in FINAL and self.pending.get(message.get("id")):
            self.pending[message["id"]] -= 1
            if not self.pending[message["id"]]:
                del self.pending[message["id"]]
        fds = take_fds(message)
        if self.writer.is_closing():
            _close_all(fds)
            return
        if fds or self.behind_fds:
            self.behind_fds.append((encode_frame(message), fds))
            self._send_with_fds()
        else:
            self.writer.write(encode_frame(message))
        unread = self.writer.transport.get_write_buffer_size() + sum(len(f) for f, _ in self.behind_fds)
        if self.limits and unread > self.limits.max_unread_reply_mb * 2**20 and self.on_overflow:
            self.on_overflow(unread)

    def _send_with_fds(self):
        """Frames carrying file descriptors go out by sendmsg once the transport's buffer is empty (the
        descriptors ride on the frame's first bytes); frames after them wait their turn."""
        while self.behind_fds:
            if self.writer.is_closing():
                return self.closed()
            if self.writer.transport.get_write_buffer_size():
                return self._retry()
            frame, fds = self.behind_fds[0]
            if fds:
                self.raw = self.raw or socket.socket(fileno=os.dup(self.writer.get_extra_info("socket").fileno()))
                try:
                    sent = socket.send_fds(self.raw, [frame], fds)
                except BlockingIOError:
                    return self._retry()
                except OSError:
                    return self.closed()
                _close_all(fds)
                frame = frame[sent:]
            self.behind_fds.popleft()
            if frame:
                self.writer.write(frame)

    def _retry(self):
        if self.retry is None:              # one timer, however many frames wait
            self.retry = self.loop.call_later(0.001, self._retried)

    def _retried(self):
        self.retry = None
        self._send_with_fds()

    def closed(self):
        """The connection is gone: descriptors not sent yet are closed."""
        while self.behind_fds:
            _close_all(self.behind_fds.popleft()[1])
        if self.raw:
            self.raw.close()
            self.raw = None

    def relay(self, on_event):
        """A reply callable for the engine thread: runs on_event on this loop."""
        return lambda event: self.loop.call_soon_threadsafe(on_event, event)

    def handle(self, kind: str, rid: int, fields: dict):
        """Dispatch one checked request; every request counted here gets exactly one final reply."""
        self.pending[rid] += 1
        if not self.greeted and kind != "hello":
            raise ProtocolError(ErrorCode.BAD_VERSION, "the first request must be hello")
        cap = self.limits.max_requests_per_client if self.limits else None
        if cap and sum(self.pending.values()) > cap:
            raise ProtocolError(ErrorCode.LIMIT, f"{kind}: {cap} requests of this connection already await "
                                "their reply (server.max_requests_per_client); read replies before sending more")
        if kind in REPORTS:
            self._check_reports(kind)
        getattr(self, f"_on_{kind}")(rid, fields)

    def _check_reports(self, kind: str):
        if self.reports >= MAX_REPORTS_IN_FLIGHT:
            raise ProtocolError(ErrorCode.LIMIT, f"{kind}: {MAX_REPORTS_IN_FLIGHT} reports of this connection "
                                "await their reply; read them before asking for more")

    def _report(self, rid: int, filter_rows=False):
        """A reply callable for status/swaps/timeline, counted against MAX_REPORTS_IN_FLIGHT."""
        self.reports += 1
        answer = self._answer(rid)

        def on_event(event):
            self.reports -= 1
            if filter_rows and isinstance(event, cmd.Result) and not self.sees_all:
                event = cmd.Result({**event.payload, "sessions": [
                    row for row in event.payload.get("sessions", []) if row["id"] in self.sessions]})
            answer(event)
        return self.relay(on_event)

    def _simple(self, rid: int):
        return self.relay(self._answer(rid))

    def _answer(self, rid: int):
        """Sends the final reply; runs on this loop."""
        def on_event(event):
            if isinstance(event, cmd.Failed):
                self.send(error_reply(rid, event.code, event.message))
            else:
                self.send({"type": "result", "id": rid, **event.payload})
        return on_event

    def _on_hello(self, rid, f):
        if f["version"] != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {f['version']} is not "
                                f"supported; this daemon speaks {PROTOCOL_VERSION}")
        self.greeted = True
        self.send({"type": "result", "id": rid, "version": PROTOCOL_VERSION, "model": self.label,
                   "has_tokenizer": self.tokenizer is not None, "daemon_pid": os.getpid(),
                   "tokenizer_dir": self.tokenizer_dir})

    def _on_open_session(self, rid, f):
        cap = self.limits.max_sessions_per_client if self.limits else None
        if cap and len(self.sessions) + self.opening >= cap:
            raise ProtocolError(ErrorCode.LIMIT, f"open_session: this connection has {cap} sessions open "
                                "(server.max_sessions_per_client); close one first")
        self.opening += 1
        answer = self._answer(rid)

        def on_event(event):
            self.opening -= 1
            if isinstance(event, cmd.Result):
                self.sessions.add(event.payload["session"])
            answer(event)
        self.inbox.put(cmd.OpenSession(self.id, self.pid, self.relay(on_event), self.uid, self.gid))

    def _on_close_session(self, rid, f):
        self.chats.pop(f["session"], None)
        if f["session"] in self.sessions:
            self.sessions.discard(f["session"])
        self.inbox.put(cmd.CloseSession(self.id, f["session"], self._simple(rid)))

    def _on_cancel(self, rid, f):
        self.inbox.put(cmd.Cancel(self.id, f["session"], self._simple(rid)))

    def _on_set_phase(self, rid, f):
        expected_s = number(f, "expected_s", None, 0, MAX_EXPECTED_S)
        self.inbox.put(cmd.SetPhase(self.id, f["session"], f["phase"], expected_s, self._simple(rid),
                                    tool=f.get("tool")))

    def _on_resume(self, rid, f):
        self.inbox.put(cmd.Resume(self.id, f["session"], f.get("shape"), f.get("dtype"), self._simple(rid)))

    def _on_status(self, rid, f):
        self.inbox.put(cmd.Status(self._report(rid, filter_rows=True)))

    def _on_swaps(self, rid, f):
        self.inbox.put(cmd.Status(self._report(rid), "swaps"))

    def _on_timeline(self, rid, f):
        self.inbox.put(cmd.Status(self._report(rid), "timeline"))

    def _on_model_config(self, rid, f):
        self.inbox.put(cmd.ModelConfig(self._simple(rid)))

    def _on_attach_weights(self, rid, f):
        self.inbox.put(cmd.AttachWeights(self.id, self.pid, bool(f.get("writable")), self._simple(rid)))

    def _on_detach_weights(self, rid, f):
        self.inbox.put(cmd.DetachWeights(self.id, self._simple(rid)))

    def _on_forward(self, rid, f):
        self.inbox.put(cmd.GhostForward(self.id, check_input_ids(f["input_ids"]), self._simple(rid), self.uid))

    def _on_harvest(self, rid, f):
        prompts, layers = intervention_fields.harvest(f, self.args.num_layers, self.args.vocab_size)
        self.inbox.put(cmd.Harvest(self.id, prompts, layers, self._simple(rid)))

    def _on_generate(self, rid, f):
        params = sampling_params(f)
        interventions = intervention_fields.interventions(f, self.args.num_layers, self.args.hidden_size)
        ids, chat = self._prompt_ids(f)
        stream = bool(f.get("stream"))
        detok = Detokenizer(self.tokenizer) if self.tokenizer else None

        def on_event(event):
            if isinstance(event, cmd.Paused):
                self.send({"type": "paused", "id": rid, "session": event.session, "layer": event.layer,
                           "step": event.step, "tensor": event.tensor})
            elif isinstance(event, cmd.Captures):
                self.send({"type": "capture", "id": rid, "layers": event.layers, "tensor": event.tensor,
                           "prompt_tokens": event.num_prompt})
            elif isinstance(event, cmd.Token):
                if stream:
                    self.send({"type": "token", "id": rid, "token": event.token,
                               "text": detok.push(event.token) if detok else None})
            elif isinstance(event, cmd.Done):
                if chat and event.finish_reason != "stop_at_layer":    # that request left no history
                    chat_record_reply(self.tokenizer, chat, event.tokens)
                    self.chats[f["session"]] = chat
                self.send({"type": "done", "id": rid, "tokens": event.tokens, "text": self._text(event.tokens),
                           "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens,
                           "cached_tokens": event.cached_tokens})
            else:
                self.send(error_reply(rid, event.code, event.message))
        self.inbox.put(cmd.Generate(self.id, f["session"], ids, params, self.relay(on_event), f.get("keep_tokens"),
                                    interventions))

    def _prompt_ids(self, f) -> tuple[list[int], ChatState | None]:
        given = [k for k in ("prompt", "prompt_ids", "messages") if f.get(k) is not None]
        if len(given) != 1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: give exactly one of prompt, prompt_ids, messages")
        if given[0] == "prompt_ids":
            ids = f["prompt_ids"]
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: prompt_ids must be a non-empty list of ints")
            return ids, None
        if self.tokenizer is None:
            raise ProtocolError(ErrorCode.NO_TOKENIZER, f"model {self.label} has no tokenizer; send prompt_ids")
        if given[0] == "messages":
            if f.get("keep_tokens") is not None:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: keep_tokens needs prompt or prompt_ids, "
                                    "not messages (the chat history would no longer match)")
            state = self.chats.get(f["session"], ChatState())
            return chat_turn(self.tokenizer, state, check_messages(f["messages"]))
        first_turn = f["session"] not in self.chats
        ids = self.tokenizer.encode(f["prompt"], add_special_tokens=first_turn)
        if not ids:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: prompt is empty")
        return ids, None

    def _text(self, tokens):
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else None


def sampling_params(f: dict) -> SamplingParams:
    """Every sampling field checked here, so one request's bad values never reach a batch."""
    temperature = number(f, "temperature", 0.0, 0, 100)
    if 0 < temperature < 1e-3:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"generate: temperature {temperature} is too small; "
                            "use 0 (greedy) or a value in [0.001, 100]")
    top_p = number(f, "top_p", 1.0, 0, 1)
    if top_p <= 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: top_p must be in (0, 1]")
    return SamplingParams(max_new_tokens=integer(f, "max_new_tokens", 64, 1, MAX_NEW_TOKENS),
                          temperature=temperature, top_p=top_p, seed=integer(f, "seed", None, 0, 2**63 - 1),
                          ignore_eos=bool(f.get("ignore_eos")),
                          breakpoints=parse_breakpoints(f.get("breakpoints") or []))


def number(f: dict, key: str, default, low: float, high: float):
    """A finite number in [low, high]; None or absent gives the default."""
    value = f.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {key!r} must be a finite number in [{low}, {high}], "
                            f"got {value!r}")
    return float(value)


def integer(f: dict, key: str, default, low: int, high: int):
    value = f.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {key!r} must be an integer in [{low}, {high}], "
                            f"got {value!r}")
    return value


def parse_breakpoints(items: list) -> list:
    """[{"layer": L, "steps": [..] | "all"}] -> [(L, set of steps or None)]; steps default to [0]."""
    out = []
    if len(items) > MAX_BREAKPOINT_ITEMS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"generate: at most {MAX_BREAKPOINT_ITEMS} breakpoints")
    for b in items:
        steps = b.get("steps", [0]) if isinstance(b, dict) else None
        ok = isinstance(b, dict) and _plain_int(b.get("layer")) and (
            steps == "all" or isinstance(steps, list) and len(steps) <= MAX_BREAKPOINT_ITEMS
            and all(_plain_int(x) and x >= 0 for x in steps))
        if not ok:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: each breakpoint is {'layer': int, "
                                "'steps': list of forward numbers (0 = the prompt) or 'all'}")
        out.append((b["layer"], None if steps == "all" else set(steps)))
    return out


def check_input_ids(rows) -> list[list[int]]:
    """A forward's input_ids: a non-empty list of equally long, non-empty lists of ints."""
    ok = rows and all(isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r)
                      for r in rows) and len({len(r) for r in rows}) == 1
    if not ok:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "forward: input_ids must be [[token, ...], ...]: "
                            "non-empty rows of ints, all of one length (no padding)")
    return rows


def _close_all(fds: list[int]):
    for fd in fds:
        os.close(fd)


def _plain_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
