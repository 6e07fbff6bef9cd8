"""What the server asks of the engine (inbox) and what the engine answers (events).

`reply` is a callable the server passes in; the engine thread calls it with events, and the
server hops them onto its own loop. This is the only engine module the server imports.
"""
from array import array
from dataclasses import dataclass, field
from typing import Callable

from libdjinn.protocol import ErrorCode
from djinnd.session import SamplingParams

Reply = Callable[[object], None]


class EngineError(Exception):
    """A request the engine refuses: answered with Failed(code, message), never a crash."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class OpenSession:
    owner: int
    owner_pid: int
    reply: Reply
    owner_uid: int | None = None   # SO_PEERCRED; None (in-process): the daemon's own
    owner_gid: int | None = None


@dataclass
class CloseSession:
    owner: int
    session: int
    reply: Reply


@dataclass
class SteerVector:
    """Add scale * values to the output of decoder `layer`, at the request's prompt, generated or all positions."""
    layer: int
    values: array                 # float32, hidden_size of them, all finite
    scale: float = 1.0
    positions: str = "all"        # all, prompt or generated


@dataclass
class Interventions:
    """A request's in-batch interventions (engine/interventions.py); checked by the server."""
    steer: list[SteerVector] = field(default_factory=list)
    capture: list[int] = field(default_factory=list)   # layers whose output goes to the session's segment
    stop_at_layer: int | None = None                    # end the prompt's forward after this layer


@dataclass
class Generate:
    owner: int
    session: int
    prompt_ids: list[int]
    params: SamplingParams
    reply: Reply
    keep_tokens: int | None = None   # cut the history to this many tokens before appending the prompt
    interventions: Interventions | None = None


@dataclass
class Harvest:
    """Layer outputs of many prompts, no sampling, the forward cut after the deepest layer."""
    owner: int
    prompts: list[list[int]]
    layers: list[int]
    reply: Reply


@dataclass
class SetPhase:
    owner: int
    session: int
    phase: str
    expected_s: float | None
    reply: Reply
    tool: str | None = None       # the tool's name: durations are learned per tool


@dataclass
class Resume:
    """Continue a paused forward with the (maybe edited) hidden states in its segment."""
    owner: int
    session: int
    shape: list | None
    dtype: str | None
    reply: Reply


@dataclass
class Cancel:
    """End the session's request in flight; the session is left as it was before that request."""
    owner: int
    session: int
    reply: Reply


@dataclass
class ReleaseOwner:
    """A connection closed (or its process died): free every session it opened."""
    owner: int


@dataclass
class Status:
    reply: Reply
    report: str = "status"        # status, swaps or timeline


@dataclass
class AttachWeights:
    """Map the daemon's weights (read-only): reply with the export handle and layout."""
    owner: int
    owner_pid: int
    writable: bool
    reply: Reply


@dataclass
class DetachWeights:
    owner: int
    reply: Reply


@dataclass
class GhostForward:
    """Logits of token ids [B][T] outside any session, written to shared memory."""
    owner: int
    input_ids: list[list[int]]
    reply: Reply
    owner_uid: int | None = None   # SO_PEERCRED: its logits count against this uid's segment quota


@dataclass
class ModelConfig:
    """The model's config as an HF config dict."""
    reply: Reply


# Events
@dataclass
class Token:
    token: int


@dataclass
class Done:
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int        # history reused from resident KV, not prefilled again


@dataclass
class Captures:
    """The request's capture segment [layers, rows, hidden_size], sent before its first token."""
    layers: list[int]
    tensor: dict
    num_prompt: int           # rows [0, num_prompt) are the prompt's; one more per token fed back


@dataclass
class Paused:
    session: int
    layer: int
    step: int
    tensor: dict              # descriptor of the hidden states in shared memory


@dataclass
class Result:
    payload: dict


@dataclass
class Failed:
    code: ErrorCode
    message: str
