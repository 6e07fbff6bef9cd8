"""Djinn wire protocol: length-prefixed msgpack frames, shared by djinnd and libdjinn.

A frame is a 4-byte big-endian body length followed by a msgpack map. Every request
carries `type` and an integer `id`; every reply echoes the `id`. Tensors never travel in
frames: they travel through shared memory, described by (segment, offset, shape, dtype); a sealed
segment's file descriptor rides beside its reply's frame (SCM_RIGHTS, see take_fds).
"""
import enum
import struct

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
HEADER = struct.Struct("!I")


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1          # the body is not a msgpack map with a type and an id
    FRAME_TOO_LARGE = 2    # the header announces more than the frame limit
    BAD_VERSION = 3        # no hello first, or a protocol version we do not speak
    UNKNOWN_TYPE = 4
    BAD_REQUEST = 5        # a field is missing, unknown or of the wrong type
    UNKNOWN_SESSION = 6
    NOT_OWNER = 7          # the session belongs to another connection
    CONTEXT_OVERFLOW = 8   # prompt plus generation exceeds the model's context
    NO_CAPACITY = 9        # can never fit in the configured memory
    PERMISSION_DENIED = 10
    BUSY = 11              # the session already has a request in flight
    NO_TOKENIZER = 12      # text asked of a model that has no tokenizer
    INTERNAL = 13
    TIMEOUT = 14           # a pause or a queued request waited past its limit, or the client gave up
    LIMIT = 15             # a per-client limit (sessions, requests, pauses, connections) is reached
    UNAVAILABLE = 16       # no daemon answers on the socket, or its engine stopped
    NOT_EXPORTED = 17      # the daemon's weights cannot be attached (streamed, or export off)


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


# Request schemas: field -> (allowed types, required). Anything else is refused by name.
_INT = (int,)
_NUM = (int, float)
REQUESTS = {
    "hello": {"version": (_INT, True), "pid": (_INT, False)},
    "open_session": {},
    "close_session": {"session": (_INT, True)},
    "set_phase": {"session": (_INT, True), "phase": ((str,), True), "expected_s": (_NUM, False),
                  "tool": ((str,), False)},
    "generate": {
        "session": (_INT, True),
        "prompt": ((str,), False),
        "prompt_ids": ((list,), False),
        "messages": ((list,), False),
        "max_new_tokens": (_INT, False),
        "temperature": (_NUM, False),
        "top_p": (_NUM, False),
        "seed": (_INT, False),
        "stream": ((bool,), False),
        "ignore_eos": ((bool,), False),
        "breakpoints": ((list,), False),   # [{"layer": L, "steps": [0, ...] or "all"}]
        "keep_tokens": (_INT, False),      # first cut the session's history to its first keep_tokens
        "steer": ((list,), False),         # [{"layer", "vector": float32 bytes or [floats], "scale", "positions"}]
        "capture": ((list,), False),       # [layer, ...]: outputs to the session's own shared memory
        "stop_at_layer": (_INT, False),    # end the prompt's forward after this layer; nothing sampled
    },
    "resume": {"session": (_INT, True), "shape": ((list,), False), "dtype": ((str,), False)},
    "cancel": {"session": (_INT, True)},    # end the session's request in flight (finish_reason "cancelled")
    "status": {},
    "swaps": {},
    "timeline": {},
    "model_config": {},                                  # the model's HF config (as a dict)
    "attach_weights": {"writable": ((bool,), False)},  # the weights export: handle + layout
    "detach_weights": {},
    "forward": {"input_ids": ((list,), True)},         # [[token, ...], ...] -> logits in shared memory
    "harvest": {"prompts": ((list,), True), "layers": ((list,), True)},   # layer outputs in shared memory
}


def encode_frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict:
    """Decode one frame body; raises ProtocolError(BAD_FRAME) on anything but a map."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame body is not msgpack: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame body must be a map with a string 'type'")
    return message


def check_request(message: dict) -> dict:
    """Validate a decoded request against REQUESTS; returns its fields without type and id."""
    kind = message["type"]
    if not isinstance(message.get("id"), int):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind}: field 'id' must be an integer")
    if kind not in REQUESTS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}")
    schema = REQUESTS[kind]
    fields = {k: v for k, v in message.items() if k not in ("type", "id")}
    for name, value in fields.items():
        if name not in schema:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind}: unknown field {name!r}")
        types, _ = schema[name]
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind}: field {name!r} has the wrong type")
    for name, (_, required) in schema.items():
        if required and fields.get(name) is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind}: field {name!r} is required")
    return fields


def take_fds(message: dict) -> list[int]:
    """The daemon's side: pull the file descriptors out of a reply ("fd" fields, at the top and one map
    down) to send beside its frame (SCM_RIGHTS); each leaves its index, and `fds` their count."""
    fds = []
    for d in [message, *(v for v in message.values() if isinstance(v, dict))]:
        if isinstance(d.get("fd"), int):
            d["fd_index"] = len(fds)
            fds.append(d.pop("fd"))
    if fds:
        message["fds"] = len(fds)
    return fds


def give_fds(message: dict, fds: list[int]):
    """The client's side of take_fds: the received descriptors go back where their indexes are."""
    for d in [message, *(v for v in message.values() if isinstance(v, dict))]:
        if "fd_index" in d:
            d["fd"] = fds[d.pop("fd_index")]


def error_reply(request_id, code: ErrorCode, message: str) -> dict:
    return {"type": "error", "id": request_id, "code": int(code), "message": message}
