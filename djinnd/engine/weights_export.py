"""Attachments to the daemon's exported weights: the attach payload (handle, layout, dtype, version),
who holds it (pid, bytes mapped, since when) for `djinnctl status`, and release when a client goes.

The buffer itself lives as long as the daemon (the model's parameters are views of it), so it is
alive while anyone is attached; a client that dies is detached when its connection closes.
"""
import time
from dataclasses import dataclass, field

from djinnd.engine.commands import EngineError
from djinnd.model.flat_weights import LAYOUT_VERSION, FlatWeights
from libdjinn.protocol import ErrorCode


@dataclass
class Attachment:
    pid: int
    nbytes: int
    since: float = field(default_factory=time.time)


class WeightExports:
    def __init__(self, loaded):
        self.loaded = loaded
        self.attachments: dict[int, Attachment] = {}     # connection id -> its attachment

    def attach(self, owner: int, pid: int, writable: bool) -> dict:
        if writable:
            raise EngineError(ErrorCode.BAD_REQUEST, "attach_weights: the weights are read-only for "
                              "attached processes; a writable attach is refused (copy what you change)")
        flat = self._exported()
        self.attachments.setdefault(owner, Attachment(pid, flat.nbytes))
        return {"layout_version": LAYOUT_VERSION, "device": str(flat.device), "nbytes": flat.nbytes,
                "tensors": flat.layout, "config": self.loaded.model.args.to_hf(), **flat.share()}

    def _exported(self) -> FlatWeights:
        flat = self.loaded.flat_weights
        if self.loaded.model.streamer is not None:
            raise EngineError(ErrorCode.NOT_EXPORTED, "attach_weights: the model is streamed through a ring "
                              "buffer (weights exceed the weight budget), so its weights are not resident to share")
        if not isinstance(flat, FlatWeights):
            why = flat.reason if flat is not None else "the weights were never packed into one buffer"
            raise EngineError(ErrorCode.NOT_EXPORTED, f"attach_weights: this daemon exports no weights: {why}")
        return flat

    def detach(self, owner: int) -> bool:
        return self.attachments.pop(owner, None) is not None

    def status(self) -> dict:
        flat, now = self.loaded.flat_weights, time.time()
        exported = isinstance(flat, FlatWeights) and self.loaded.model.streamer is None
        return {"exported": exported, "kind": flat.handle()["kind"] if exported else None,
                "bytes": flat.nbytes if exported else 0,
                "reason": None if exported else getattr(flat, "reason", "streamed or not packed"),
                "attachments": [{"pid": a.pid, "bytes_mapped": a.nbytes, "since": a.since,
                                 "seconds": round(now - a.since, 1)} for a in self.attachments.values()]}

    def close(self):
        if isinstance(self.loaded.flat_weights, FlatWeights):
            self.loaded.flat_weights.close()
