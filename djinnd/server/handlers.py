"""One client connection: validated requests in, engine commands out, engine events back as frames.

Runs on the server's event loop; engine events arrive from the engine thread through `relay`.
Ownership is checked by the engine (a session remembers the connection that opened it).
"""
import os

from djinnd.engine import commands as cmd
from djinnd.server.text import ChatState, Detokenizer, chat_record_reply, chat_turn, check_messages
from djinnd.session import SamplingParams
from libdjinn.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError, encode_frame, error_reply


class Connection:
    def __init__(self, conn_id: int, pid: int, writer, inbox, loaded, loop):
        self.id, self.pid, self.writer, self.inbox, self.loop = conn_id, pid, writer, inbox, loop
        self.tokenizer, self.label = loaded.tokenizer, loaded.label
        self.tokenizer_dir = loaded.tokenizer_dir
        self.greeted = False
        self.chats: dict[int, ChatState] = {}

    def send(self, message: dict):
        if not self.writer.is_closing():
            self.writer.write(encode_frame(message))

    def relay(self, on_event):
        """A reply callable for the engine thread: runs on_event on this loop."""
        return lambda event: self.loop.call_soon_threadsafe(on_event, event)

    def handle(self, kind: str, rid: int, fields: dict):
        if not self.greeted and kind != "hello":
            raise ProtocolError(ErrorCode.BAD_VERSION, "the first request must be hello")
        getattr(self, f"_on_{kind}")(rid, fields)

    def _simple(self, rid: int):
        def on_event(event):
            if isinstance(event, cmd.Failed):
                self.send(error_reply(rid, event.code, event.message))
            else:
                self.send({"type": "result", "id": rid, **event.payload})
        return self.relay(on_event)

    def _on_hello(self, rid, f):
        if f["version"] != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {f['version']} is not "
                                f"supported; this daemon speaks {PROTOCOL_VERSION}")
        self.greeted = True
        self.send({"type": "result", "id": rid, "version": PROTOCOL_VERSION, "model": self.label,
                   "has_tokenizer": self.tokenizer is not None, "daemon_pid": os.getpid(),
                   "tokenizer_dir": self.tokenizer_dir})

    def _on_open_session(self, rid, f):
        self.inbox.put(cmd.OpenSession(self.id, self.pid, self._simple(rid)))

    def _on_close_session(self, rid, f):
        self.chats.pop(f["session"], None)
        self.inbox.put(cmd.CloseSession(self.id, f["session"], self._simple(rid)))

    def _on_set_phase(self, rid, f):
        self.inbox.put(cmd.SetPhase(self.id, f["session"], f["phase"], f.get("expected_s"), self._simple(rid),
                                    tool=f.get("tool")))

    def _on_resume(self, rid, f):
        self.inbox.put(cmd.Resume(self.id, f["session"], f.get("shape"), f.get("dtype"), self._simple(rid)))

    def _on_status(self, rid, f):
        self.inbox.put(cmd.Status(self._simple(rid)))

    def _on_swaps(self, rid, f):
        self.inbox.put(cmd.Status(self._simple(rid), "swaps"))

    def _on_timeline(self, rid, f):
        self.inbox.put(cmd.Status(self._simple(rid), "timeline"))

    def _on_model_config(self, rid, f):
        self.inbox.put(cmd.ModelConfig(self._simple(rid)))

    def _on_attach_weights(self, rid, f):
        self.inbox.put(cmd.AttachWeights(self.id, self.pid, bool(f.get("writable")), self._simple(rid)))

    def _on_detach_weights(self, rid, f):
        self.inbox.put(cmd.DetachWeights(self.id, self._simple(rid)))

    def _on_forward(self, rid, f):
        self.inbox.put(cmd.GhostForward(self.id, check_input_ids(f["input_ids"]), self._simple(rid)))

    def _on_generate(self, rid, f):
        params = sampling_params(f)
        ids, chat = self._prompt_ids(f)
        stream = bool(f.get("stream"))
        detok = Detokenizer(self.tokenizer) if self.tokenizer else None

        def on_event(event):
            if isinstance(event, cmd.Paused):
                self.send({"type": "paused", "id": rid, "session": event.session, "layer": event.layer,
                           "step": event.step, "tensor": event.tensor})
            elif isinstance(event, cmd.Token):
                if stream:
                    self.send({"type": "token", "id": rid, "token": event.token,
                               "text": detok.push(event.token) if detok else None})
            elif isinstance(event, cmd.Done):
                if chat:
                    chat_record_reply(self.tokenizer, chat, event.tokens)
                    self.chats[f["session"]] = chat
                self.send({"type": "done", "id": rid, "tokens": event.tokens, "text": self._text(event.tokens),
                           "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens,
                           "cached_tokens": event.cached_tokens})
            else:
                self.send(error_reply(rid, event.code, event.message))
        self.inbox.put(cmd.Generate(self.id, f["session"], ids, params, self.relay(on_event), f.get("keep_tokens")))

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
    p = SamplingParams(max_new_tokens=f.get("max_new_tokens", 64), temperature=float(f.get("temperature", 0.0)),
                       top_p=float(f.get("top_p", 1.0)), seed=f.get("seed"), ignore_eos=bool(f.get("ignore_eos")),
                       breakpoints=parse_breakpoints(f.get("breakpoints") or []))
    if p.max_new_tokens < 1:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: max_new_tokens must be >= 1")
    if p.temperature < 0 or not 0 < p.top_p <= 1:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "generate: temperature must be >= 0 and top_p in (0, 1]")
    return p


def parse_breakpoints(items: list) -> list:
    """[{"layer": L, "steps": [..] | "all"}] -> [(L, set of steps or None)]; steps default to [0]."""
    out = []
    for b in items:
        steps = b.get("steps", [0]) if isinstance(b, dict) else None
        ok = isinstance(b, dict) and isinstance(b.get("layer"), int) and (
            steps == "all" or isinstance(steps, list) and all(isinstance(x, int) and x >= 0 for x in steps))
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
