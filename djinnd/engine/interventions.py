"""Interventions inside the batch: a session's steering vectors, added to chosen layers' outputs, and
its captured layer outputs, written to a shared-memory segment only it can open. Both run in the
batched forward (prefill rows and CUDA-graph decode rows alike), with no pause and no socket copy;
breakpoints (engine/breakpoints.py) stay the tool for arbitrary edits.

A request's rows are its tokens in order: rows [0, P) its P prompt tokens, then one per generated
token fed back. The capture segment is [layers, P + max_new_tokens, hidden_size]; row r of layer
l is written once, right after the forward that computed it and before the token it produced is
sent, so a streaming reader sees each token's rows when the token arrives.
"""
import logging
import os
from dataclasses import dataclass, field

import posix_ipc
import torch

from djinnd.engine import commands as cmd
from djinnd.memory.activations import ActivationSegment, SegmentTable

log = logging.getLogger("djinnd.interventions")


@dataclass
class Steer:
    vector: torch.Tensor          # scale * values [hidden_size], model dtype, on the device
    positions: str                # all, prompt or generated

    def span(self, row: int, count: int, num_prompt: int) -> tuple[int, int]:
        """The part of rows [row, row + count) this vector applies to."""
        lo, hi = row, row + count
        if self.positions == "prompt":
            hi = min(hi, num_prompt)
        elif self.positions == "generated":
            lo = max(lo, num_prompt)
        return lo, max(lo, hi)


@dataclass
class Active:
    """One request's interventions."""
    first: int                    # index in session.tokens of the request's first prompt token
    num_prompt: int
    steer: dict[int, Steer] = field(default_factory=dict)
    capture: list[int] = field(default_factory=list)
    stop_at_layer: int | None = None
    segment: ActivationSegment | None = None
    fd: int | None = None         # kept open: one pwrite per row, no shm_open per step
    row_bytes: int = 0
    num_rows: int = 0

    def write(self, layer: int, row: int, data):
        """data: uint8 numpy bytes of consecutive rows starting at `row`, of capture layer `layer`."""
        if self.fd is None or row >= self.num_rows:
            return
        data = data.reshape(-1)[:(self.num_rows - row) * self.row_bytes]
        try:
            pwrite_all(self.fd, data, (self.capture.index(layer) * self.num_rows + row) * self.row_bytes)
        except OSError as e:        # the client's own segment failed it: stop writing, never fail the batch
            log.warning("capture segment %s: %s; capture stops", self.segment.name, e)
            self.close_fd()

    def close_fd(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Interventions:
    def __init__(self, hidden_size: int, dtype, device):
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.active: dict[int, Active] = {}                 # session id -> its request's interventions
        self.segments = SegmentTable()      # session id -> its last capture segment

    def of(self, session_id: int) -> Active | None:
        return self.active.get(session_id)

    def start(self, session_id: int, spec: cmd.Interventions | None, first: int, num_prompt: int,
              max_new_tokens: int, charge: tuple = (None, None)) -> cmd.Captures | None:
        """A request begins; returns its capture segment's event, if it captures. charge: (quota,
        owner) the segment counts against (QuotaExceeded past its caps)."""
        self.end(session_id)        # a request that never ran (refused, cancelled while queued) left its own
        if spec is None or not (spec.steer or spec.capture or spec.stop_at_layer is not None):
            return None
        a = Active(first, num_prompt, stop_at_layer=spec.stop_at_layer, capture=list(spec.capture))
        for v in spec.steer:
            values = torch.frombuffer(bytearray(v.values), dtype=torch.float32)
            a.steer[v.layer] = Steer((values * v.scale).to(self.device, self.dtype), v.positions)
        if a.capture:
            self._open_segment(session_id, a, num_prompt + max_new_tokens, charge)
        self.active[session_id] = a
        return cmd.Captures(a.capture, a.segment.descriptor(), num_prompt) if a.segment else None

    def _open_segment(self, session_id: int, a: Active, num_rows: int, charge: tuple):
        self.close(session_id)          # the previous request's segment goes (its client has mapped it)
        a.segment = ActivationSegment((len(a.capture), num_rows, self.hidden_size), self.dtype, *charge)
        shm = posix_ipc.SharedMemory(a.segment.name)
        a.fd, a.num_rows = shm.fd, num_rows
        a.row_bytes = self.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        self.segments[session_id] = a.segment

    def end(self, session_id: int):
        """The request is over; its segment stays (unlinked at the session's next capture or close)."""
        a = self.active.pop(session_id, None)
        if a is not None:
            a.close_fd()

    def close(self, session_id: int):
        """The session is gone (or captures again): unlink its segment."""
        self.end(session_id)
        self.segments.release(session_id)

    def close_all(self):
        for session_id in list(self.segments):
            self.close(session_id)

    # ---- prefill (and breakpoint segments): per-token rows --------------------------------
    def prefill_hook(self, chunks):
        """after(i, h) for run_layers over chunks [(session, n)], or None if none intervenes."""
        spans, at = [], 0           # (active, index of its first row in h, its request row, count)
        for s, n in chunks:
            a = self.active.get(s.id)
            lo = max(s.num_cached, a.first) if a else 0      # history fed again after a drop is not this request's
            if a is not None and lo < s.num_cached + n:
                spans.append((a, at + lo - s.num_cached, lo - a.first, s.num_cached + n - lo))
            at += n
        if not spans:
            return None

        def after(i: int, h):
            for a, at, row, count in spans:
                steer = a.steer.get(i)
                if steer is not None:
                    lo, hi = steer.span(row, count, a.num_prompt)
                    h[at + lo - row:at + hi - row] += steer.vector
                if i in a.capture:
                    a.write(i, row, host_bytes(h[at:at + count]))
            return h
        return after

    # ---- decode: rows of the DecodeBatch ----------------------------------------------------
    def decode_vectors(self, session_id: int) -> dict[int, torch.Tensor]:
        """layer -> vector for the session's decode row (generated positions only)."""
        a = self.active.get(session_id)
        return {} if a is None else {l: s.vector for l, s in a.steer.items() if s.positions != "prompt"}

    def mode(self, sessions) -> str:
        """What a decode step over `sessions` needs: plain, steer or capture (which steers too)."""
        actives = [self.active.get(s.id) for s in sessions]
        if any(a is not None and a.capture and a.fd is not None for a in actives):
            return "capture"
        return "steer" if any(a is not None and a.steer for a in actives) else "plain"

    def capture_layers(self, sessions) -> list[int]:
        return sorted({l for s in sessions if (a := self.active.get(s.id)) for l in a.capture})

    def write_decode(self, sessions, actives, layers: list[int], staged, positions):
        """After a decode step: staged [len(layers), n, hidden] on the host, positions [n] after the step."""
        raw = staged.view(torch.uint8).numpy()
        for r, s in enumerate(sessions):
            a = actives[r]
            if a is None or not a.capture or self.active.get(s.id) is not a:
                continue
            row = int(positions[r]) - 1 - a.first
            for layer in a.capture:
                a.write(layer, row, raw[layers.index(layer), r])


def pwrite_all(fd: int, data, offset: int):
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def write_segment(segment: ActivationSegment, data, offset: int):
    """Bytes into a segment the daemon never maps (see memory/activations.py)."""
    shm = posix_ipc.SharedMemory(segment.name)
    try:
        pwrite_all(shm.fd, data.reshape(-1), offset)
    finally:
        shm.close_fd()


def host_bytes(h):
    """Rows of h as uint8 numpy bytes on the host (a copy: h is changed in place by the next layer)."""
    return h.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy()
