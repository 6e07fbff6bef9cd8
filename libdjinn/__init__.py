"""libdjinn: the client library agents import to use a shared model served by djinnd."""
from libdjinn.client import (BadRequest, Connection, ContextOverflow, DjinnError, Generation, NoCapacity,
                             NotExported, NotOwner, Session, TokenEvent, UnknownSession)
from libdjinn.ghost import GhostModel
from libdjinn.protocol import ErrorCode
from libdjinn.trace import Pause, Trace


def connect(path: str | None = None) -> Connection:
    """Connect to djinnd at `path`, else DJINN_SOCKET, else the default socket path."""
    return Connection(path)


__all__ = ["connect", "Connection", "Session", "Generation", "TokenEvent", "DjinnError", "ErrorCode",
           "UnknownSession", "NotOwner", "ContextOverflow", "NoCapacity", "BadRequest", "NotExported", "Pause", "Trace",
           "GhostModel"]
