"""The agent side: a Connection to djinnd and the Sessions it opens. No torch, no CUDA.

A reader thread routes replies by request id, so one connection can have several requests in
flight (a generate streaming in one thread while another sets a phase).
"""
import array
import contextlib
import itertools
import os
import queue
import socket
import threading
from dataclasses import dataclass, field

from libdjinn.interventions import Activations, Harvest, harvest_batches, steer_fields
from libdjinn.paths import default_socket_path, tmp_socket_path, untrusted_folder
from libdjinn.protocol import HEADER, PROTOCOL_VERSION, ErrorCode, decode_body, encode_frame, give_fds
from libdjinn.shm import MappedTensor
from libdjinn.trace import Pause, Trace  # noqa: F401


class DjinnError(Exception):
    """An error reply from djinnd; `code` is a libdjinn.protocol.ErrorCode."""

    def __init__(self, code, message: str):
        super().__init__(f"{ErrorCode(code).name}: {message}")
        self.code, self.message = ErrorCode(code), message


class UnknownSession(DjinnError): pass
class NotOwner(DjinnError): pass
class ContextOverflow(DjinnError): pass
class NoCapacity(DjinnError): pass
class BadRequest(DjinnError): pass
class NotExported(DjinnError): pass
class LimitReached(DjinnError): pass
class DaemonUnavailable(DjinnError, ConnectionError): pass   # no daemon on the socket, or it went away
class Timeout(DjinnError, TimeoutError): pass


ERRORS = {ErrorCode.UNKNOWN_SESSION: UnknownSession, ErrorCode.NOT_OWNER: NotOwner,
          ErrorCode.CONTEXT_OVERFLOW: ContextOverflow, ErrorCode.NO_CAPACITY: NoCapacity,
          ErrorCode.BAD_REQUEST: BadRequest, ErrorCode.NOT_EXPORTED: NotExported, ErrorCode.LIMIT: LimitReached,
          ErrorCode.UNAVAILABLE: DaemonUnavailable, ErrorCode.TIMEOUT: Timeout}
FD_SPACE = socket.CMSG_SPACE(8 * array.array("i").itemsize)   # descriptors beside one frame, at most
DEFAULT_TIMEOUT_S = 900.0   # longest wait for the daemon's next reply (above its queue_timeout_s)


def raise_for(reply: dict):
    if reply.get("type") == "error":
        raise ERRORS.get(reply["code"], DjinnError)(reply["code"], reply["message"])
    return reply


@dataclass
class Generation:
    text: str | None
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    activations: Activations | dict = field(default_factory=dict)   # capture=[...]: layer -> view [rows, hidden]


@dataclass
class TokenEvent:
    token: int
    text: str | None
    activations: Activations | None = None   # capture=[...]: the rows computed up to this token


def generation(reply: dict, captured: Activations | None = None) -> Generation:
    acts = captured.upto(len(reply["tokens"])) if captured else {}
    return Generation(reply["text"], reply["tokens"], reply["finish_reason"], reply["prompt_tokens"],
                      reply["cached_tokens"], acts)


class Connection:
    def __init__(self, path: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S):
        """timeout: seconds to wait for each reply of the daemon (None: forever)."""
        self.path, self.timeout = path or default_socket_path(), timeout
        self.sock = _connect(self.path)
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._closed: Exception | None = None
        self._harvesting, self._harvest_tokens = threading.Lock(), None   # tokens one harvest call takes
        self._fds: list[int] = []      # received beside frames (SCM_RIGHTS), not yet given to a reply
        self._reader = threading.Thread(target=self._read_loop, name="libdjinn-reader", daemon=True)
        self._reader.start()
        self.info = self.request("hello", version=PROTOCOL_VERSION, pid=os.getpid())

    def session(self) -> "Session":
        return Session(self, self.request("open_session")["session"])

    def status(self) -> dict:
        return self.request("status")

    def harvest(self, prompts: list[list[int]], layers: list[int], max_batch_tokens: int | None = None) -> Harvest:
        """The outputs of decoder `layers` for every token of `prompts` (lists of token ids), batched
        across prompts at prefill speed, the forward cut after the deepest layer, nothing sampled and
        no session touched. h[layer]: [total tokens, hidden]; h.prompt(i, layer): prompt i's rows.
        One daemon forward takes up to its max_num_batched_tokens (or max_batch_tokens) at a time."""
        with self._harvesting:       # the daemon replaces a connection's harvest segment at its next call
            if self._harvest_tokens is None:
                self._harvest_tokens = self.request("model_config")["max_harvest_tokens"]
            parts, rest = [], [list(p) for p in prompts]
            while rest:
                batch = harvest_batches(rest, min(self._harvest_tokens, max_batch_tokens or 1 << 62))[0]
                reply = self.request("harvest", prompts=batch, layers=list(layers))
                parts.append((MappedTensor(reply["tensor"]), reply["lengths"]))   # mapped before the next call
                rest = rest[len(batch):]
            return Harvest(list(layers), parts)

    def attach_weights(self, writable: bool = False):
        """The daemon's weights as HF-named torch tensors sharing its memory, read-only (libdjinn/weights.py)."""
        from libdjinn.weights import attach_weights
        return attach_weights(self, writable)

    def hf_model(self):
        """An HF transformers LlamaForCausalLM whose parameters are the attached weights (no copy)."""
        from libdjinn.weights import hf_model
        return hf_model(self.attach_weights())

    def request(self, kind: str, **fields) -> dict:
        """One request, one reply; raises the DjinnError subclass for an error reply."""
        for reply in self.replies(kind, **fields):
            last = reply
        return raise_for(last)

    def replies(self, kind: str, **fields):
        """Yield replies to one request until its final one (result, done or error). Left early
        (break, an exception, a timeout), a generate is cancelled in the daemon."""
        rid, inbox = next(self._ids), queue.Queue()
        self._send(rid, kind, fields, inbox)
        finished = False
        try:
            while True:
                try:
                    reply = inbox.get(timeout=self.timeout)
                except queue.Empty:
                    raise Timeout(ErrorCode.TIMEOUT, f"{kind}: no reply from djinnd at {self.path} within "
                                  f"{self.timeout:g} s") from None
                finished = isinstance(reply, Exception) or reply["type"] not in ("token", "paused", "capture")
                if isinstance(reply, Exception):
                    raise reply
                yield reply
                if finished:
                    return
        finally:
            self._pending.pop(rid, None)
            if not finished and kind == "generate":
                self.cancel(fields["session"])

    def cancel(self, session_id: int):
        """End the session's request in flight, without waiting for the answer."""
        with contextlib.suppress(DjinnError, OSError):
            self._send(next(self._ids), "cancel", {"session": session_id}, None)

    def _send(self, rid: int, kind: str, fields: dict, inbox):
        with self._lock:
            if self._closed:
                raise self._gone()
            if inbox is not None:
                self._pending[rid] = inbox
            try:
                self.sock.sendall(encode_frame({"type": kind, "id": rid, **fields}))
                return
            except OSError as e:
                self._pending.pop(rid, None)
                failure = e
        self._reader.join(2)        # the daemon may have said why it hung up (a LIMIT at connect)
        raise self._gone(failure)

    def _gone(self, why: Exception | None = None) -> DjinnError:
        if isinstance(self._closed, DjinnError):
            return self._closed
        return DaemonUnavailable(ErrorCode.UNAVAILABLE, f"connection to djinnd at {self.path} is closed: "
                                 f"{self._closed or why}")

    def _read_loop(self):
        try:
            while True:
                (size,) = HEADER.unpack(self._recv(HEADER.size))
                reply = decode_body(self._recv(size))
                if reply.get("fds"):          # its descriptors came with its first bytes, or before
                    fds, self._fds = self._fds[:reply["fds"]], self._fds[reply["fds"]:]
                    give_fds(reply, fds)
                target = self._pending.get(reply.get("id"))
                if target is not None:
                    target.put(reply)
                elif reply.get("type") == "error":  # not tied to a request: the daemon hangs up
                    raise_for(reply)
        except Exception as e:
            with self._lock:
                self._closed = e
                for inbox in list(self._pending.values()):
                    inbox.put(e if isinstance(e, DjinnError) else DaemonUnavailable(
                        ErrorCode.UNAVAILABLE, f"djinnd at {self.path} went away: {e}"))

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk, ancillary, _, _ = self.sock.recvmsg(n - len(buf), FD_SPACE)
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self._fds += array.array("i", data[:len(data) - len(data) % 4]).tolist()
            if not chunk:
                raise ConnectionError("socket closed")
            buf += chunk
        return bytes(buf)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Session:
    """A conversation whose tokens and KV cache live in the daemon across turns."""

    def __init__(self, conn: Connection, session_id: int):
        self.conn, self.id = conn, session_id

    def generate(self, prompt: str | None = None, *, prompt_ids=None, messages=None, hooks=None, hook_steps="all",
                 steer=None, capture=None, **sampling) -> Generation:
        """Append the prompt (text, token ids, or chat messages) and generate; returns the whole reply.
        sampling: max_new_tokens, temperature (0 = greedy), top_p, seed, ignore_eos.
        steer: {layer: vector or Steer} added to that decoder layer's output, in the batch (no pause).
        capture: [layer, ...]: Generation.activations[layer] holds that layer's output for every prompt
        and generated token (a zero-copy view on this session's shared memory).
        hooks: {layer: fn(pause)} run on the output of that decoder layer in forwards `hook_steps`
        ("all", the default, as an HF forward hook; or a list: 0 = the prompt's, k = the k-th new
        token's); fn edits pause.hidden in place, or returns a tensor that replaces it. Each call is a
        round trip: prefer steer/capture where they do the job."""
        if hooks:
            trace = self.trace(prompt, prompt_ids=prompt_ids, messages=messages, steps=hook_steps,
                               breakpoints=sorted(hooks), steer=steer, capture=capture, **sampling)
            for pause in trace:
                replacement = hooks[pause.layer](pause)
                if replacement is not None:
                    pause.resume(replacement)
            return trace.result
        captured = None
        fields = self._generate_fields(prompt, prompt_ids, messages, sampling, steer, capture)
        for reply in self.conn.replies("generate", **fields):
            if raise_for(reply)["type"] == "capture":
                captured = Activations(reply)
        return generation(reply, captured)

    def chat(self, message: str, **sampling) -> Generation:
        """One user turn through the model's chat template; history stays resident in the daemon."""
        return self.generate(messages=[{"role": "user", "content": message}], **sampling)

    def stream(self, prompt: str | None = None, *, prompt_ids=None, messages=None, steer=None, capture=None,
               **sampling):
        """Yield a TokenEvent per token as it is produced (with capture: the rows computed so far)."""
        fields = self._generate_fields(prompt, prompt_ids, messages, sampling, steer, capture)
        replies, captured, count = self.conn.replies("generate", stream=True, **fields), None, 0
        try:
            for reply in replies:
                raise_for(reply)
                if reply["type"] == "capture":
                    captured = Activations(reply)
                elif reply["type"] == "token":
                    count += 1
                    yield TokenEvent(reply["token"], reply["text"], captured.upto(count) if captured else None)
        finally:
            replies.close()     # an abandoned stream is cancelled in the daemon

    def cancel(self):
        """End this session's request in flight (a stream or trace another thread is reading)."""
        return self.conn.request("cancel", session=self.id)

    def trace(self, prompt: str | None = None, *, prompt_ids=None, messages=None, breakpoints=(), steps=(0,),
              steer=None, capture=None, stop_at_layer=None, **sampling) -> "Trace":
        """Generate with pauses after the given decoder layers, in forwards `steps` (or "all");
        iterate over the returned Trace to get each Pause, then read trace.result. stop_at_layer=L
        ends the prompt's forward after layer L: nothing is sampled and the history is left as it was."""
        fields = self._generate_fields(prompt, prompt_ids, messages, sampling, steer, capture)
        if stop_at_layer is not None:
            fields["stop_at_layer"] = stop_at_layer
        fields["breakpoints"] = [{"layer": layer, "steps": steps if steps == "all" else list(steps)}
                                 for layer in breakpoints]
        return Trace(self, fields)

    def signal_phase(self, phase: str, expected_s: float | None = None, tool: str | None = None):
        """Tell the daemon what the agent is doing: "ACTIVE" or "IO_WAIT" (in a tool call, expected to
        take expected_s seconds; without it the daemon learns the durations of `tool` or of this session)."""
        named = {"tool": tool} if tool is not None else {}
        self.conn.request("set_phase", session=self.id, phase=phase, expected_s=expected_s, **named)

    @contextlib.contextmanager
    def tool_call(self, expected_s: float | None = None, tool: str | None = None):
        """IO_WAIT for the duration of the block, ACTIVE after it."""
        self.signal_phase("IO_WAIT", expected_s, tool)
        try:
            yield
        finally:
            self.signal_phase("ACTIVE")

    def harvest(self, prompts: list[list[int]], layers: list[int]) -> Harvest:
        """Layer outputs of many prompts (token ids), batched, nothing sampled: see Connection.harvest."""
        return self.conn.harvest(prompts, layers)

    def close(self):
        self.conn.request("close_session", session=self.id)

    def _generate_fields(self, prompt, prompt_ids, messages, sampling, steer=None, capture=None) -> dict:
        fields = {"session": self.id, "prompt": prompt, "prompt_ids": prompt_ids, "messages": messages,
                  "steer": steer_fields(steer), "capture": list(capture) if capture else None, **sampling}
        return {k: v for k, v in fields.items() if v is not None}


def _connect(path: str) -> socket.socket:
    """A connected socket, or a DaemonUnavailable naming the path and the likely fix."""
    if path == tmp_socket_path() and (why := untrusted_folder(os.path.dirname(path))):
        raise DaemonUnavailable(ErrorCode.PERMISSION_DENIED, f"refusing {path}: {why}; another user may "
                                "control it. Remove the folder, or set DJINN_SOCKET or XDG_RUNTIME_DIR")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError, TimeoutError) as e:
        sock.close()
        fix = {FileNotFoundError: "no socket there: start djinnd (or `systemctl start djinnd.socket`), or "
                                  "set DJINN_SOCKET to the daemon's socket",
               ConnectionRefusedError: "nothing listens there: djinnd is not running",
               PermissionError: "not allowed: ask to join the daemon's group (server.allowed_group)",
               TimeoutError: "the daemon does not accept connections (overloaded?)"}[type(e)]
        raise DaemonUnavailable(ErrorCode.UNAVAILABLE, f"cannot connect to djinnd at {path}: {fix}") from None
    sock.settimeout(None)
    return sock
