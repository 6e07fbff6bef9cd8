"""Breakpoints on the client: iterate over the pauses of one generate call.

    for bp in session.trace("The capital of France is", breakpoints=[12], max_new_tokens=8):
        bp.hidden.mul_(0.9)          # torch view on the daemon's shared memory: zero copy
    print(trace.result.text)

A pause is resumed when the loop moves on (or explicitly with bp.resume()). Its views are valid
until then; copy what you want to keep.
"""
from libdjinn.shm import MappedTensor


class Pause:
    """The forward of one session, held after decoder layer `layer` of forward `step`."""

    def __init__(self, session, reply: dict):
        self.session, self.layer, self.step = session, reply["layer"], reply["step"]
        self._mapped = MappedTensor(reply["tensor"])
        self.shape, self.dtype = self._mapped.shape, self._mapped.dtype
        self.resumed = False
        self._hidden = None

    @property
    def hidden(self):
        """Hidden states [tokens of this forward, hidden_size] as a torch view; edit in place."""
        if self._hidden is None:
            self._hidden = self._mapped.torch()
        return self._hidden

    def numpy(self):
        return self._mapped.numpy()

    def resume(self, replacement=None):
        """Continue the forward from the (edited) hidden states, or from `replacement` (a torch tensor
        or numpy array of the same shape and dtype; anything else is refused, never ignored)."""
        fields = {}
        if replacement is not None:
            fields = self._replace(replacement)
        self.session.conn.request("resume", session=self.session.id, **fields)
        self.resumed = True
        self.close()

    def _replace(self, replacement) -> dict:
        if not (hasattr(replacement, "shape") and hasattr(replacement, "dtype")):
            raise TypeError(f"layer {self.layer}: a hook or resume() returned {type(replacement).__name__}; "
                            f"return None (edit bp.hidden in place) or a tensor of shape {list(self.shape)}")
        fields = {"shape": list(replacement.shape), "dtype": str(replacement.dtype).replace("torch.", "")}
        if fields["shape"] == list(self.shape) and fields["dtype"] == self.dtype:
            if hasattr(replacement, "data_ptr") and replacement.data_ptr() == self.hidden.data_ptr():
                return fields        # the hook returned the view it edited in place
            import torch
            self.hidden.copy_(torch.as_tensor(replacement))
        return fields                # a mismatch: the daemon refuses it by name (BadRequest), still paused

    def close(self):
        self._hidden = None
        self._mapped.close()


class Trace:
    def __init__(self, session, fields: dict):
        self.session, self.fields = session, fields
        self.result = None

    def __iter__(self):
        from libdjinn.client import generation, raise_for
        from libdjinn.interventions import Activations
        replies, pause, captured = self.session.conn.replies("generate", **self.fields), None, None
        try:
            for reply in replies:
                raise_for(reply)
                if reply["type"] == "capture":
                    captured = Activations(reply)
                elif reply["type"] == "paused":
                    pause = Pause(self.session, reply)
                    yield pause
                    if not pause.resumed:
                        pause.resume()
                elif reply["type"] == "done":
                    self.result = generation(reply, captured)
        finally:       # left early (break, exception): the daemon cancels the request and frees the pause
            replies.close()
            if pause is not None and not pause.resumed:
                pause.close()
