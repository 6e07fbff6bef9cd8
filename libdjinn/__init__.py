"""libdjinn: the client library agents import to use a shared model served by djinnd."""
from libdjinn.client import (BadRequest, Connection, ContextOverflow, DaemonUnavailable, DjinnError, Generation,
                             LimitReached, NoCapacity, NotExported, NotOwner, Session, Timeout, TokenEvent,
                             UnknownSession)
from libdjinn.client import DEFAULT_TIMEOUT_S
from libdjinn.ghost import GhostModel
from libdjinn.interventions import Activations, Harvest, Steer
from libdjinn.protocol import ErrorCode
from libdjinn.trace import Pause, Trace


def connect(path: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S) -> Connection:
    """Connect to djinnd at `path`, else DJINN_SOCKET, else the default socket path. `timeout`: seconds
    to wait for each reply (None: forever); DaemonUnavailable names the path and the fix."""
    return Connection(path, timeout)


__all__ = ["connect", "Connection", "Session", "Generation", "TokenEvent", "DjinnError", "ErrorCode",
           "UnknownSession", "NotOwner", "ContextOverflow", "NoCapacity", "BadRequest", "NotExported",
           "LimitReached", "DaemonUnavailable", "Timeout", "Pause", "Trace", "GhostModel", "Steer", "Activations",
           "Harvest"]
