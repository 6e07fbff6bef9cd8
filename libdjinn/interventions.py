"""Steering and capture on the client: vectors to wire fields, captured layer outputs as zero-copy views.

    g = s.generate("Hi", steer={16: vector}, capture=[16])      # vector: torch, numpy or a list
    g.activations[16]                                           # [prompt + generated rows, hidden] view
    s.generate("Hi", steer={16: libdjinn.Steer(vector, scale=4, positions="generated")})

Vectors travel as float32 bytes in the request frame (hidden_size x 4 bytes each; never pickle).
"""
from dataclasses import dataclass

import numpy as np

from libdjinn.shm import MappedTensor


@dataclass
class Steer:
    """A steering vector with its scale and where it applies: "all", "prompt" or "generated" positions."""
    vector: object
    scale: float = 1.0
    positions: str = "all"


def float32_bytes(vector) -> bytes:
    if hasattr(vector, "detach"):              # torch, any device or dtype
        vector = vector.detach().float().cpu().numpy()
    return np.ascontiguousarray(vector, dtype="<f4").reshape(-1).tobytes()


def steer_fields(steer: dict | None) -> list[dict] | None:
    """{layer: vector or Steer} -> the request's "steer" field."""
    if not steer:
        return None
    out = []
    for layer, item in steer.items():
        item = item if isinstance(item, Steer) else Steer(item)
        out.append({"layer": layer, "vector": float32_bytes(item.vector), "scale": float(item.scale),
                    "positions": item.positions})
    return out


class Activations:
    """Captured outputs by layer: `acts[layer]` is a torch view [rows, hidden_size] (numpy without
    torch; `acts.numpy(layer)` always numpy). Views read the session's segment in place, no copy;
    they stay valid after the session's next request (the mapping outlives the daemon's name)."""

    def __init__(self, reply: dict):
        self.layers, self.num_prompt = list(reply["layers"]), reply["prompt_tokens"]
        self._mapped = MappedTensor(reply["tensor"])
        self.num_rows = 0        # rows computed so far: the prompt's, then one per token fed back

    def upto(self, num_tokens: int) -> "Activations":
        """The rows of the prompt and of the first num_tokens - 1 generated tokens (the last is not fed)."""
        view = Activations.__new__(Activations)
        view.layers, view.num_prompt, view._mapped = self.layers, self.num_prompt, self._mapped
        view.num_rows = self.num_prompt + max(num_tokens - 1, 0)
        return view

    def __getitem__(self, layer: int):
        try:
            return self._mapped.torch()[self.layers.index(layer), :self.num_rows]
        except ImportError:
            return self.numpy(layer)

    def numpy(self, layer: int) -> np.ndarray:
        return self._mapped.numpy()[self.layers.index(layer), :self.num_rows]

    def __contains__(self, layer) -> bool:
        return layer in self.layers

    def keys(self):
        return list(self.layers)

    def __repr__(self) -> str:
        return f"Activations(layers={self.layers}, rows={self.num_rows})"


class Harvest:
    """Layer outputs of a batch of prompts: `h[layer]` [total tokens, hidden] and `h.prompt(i, layer)`."""

    def __init__(self, layers: list[int], parts: list[tuple[MappedTensor, list[int]]]):
        self.layers, self._parts = layers, parts       # one part per daemon call: (segment, prompt lengths)
        self.lengths = [n for _, lengths in parts for n in lengths]

    def __getitem__(self, layer: int):
        """One part per daemon call; concatenated (a copy) only when the prompts took several calls."""
        i = self.layers.index(layer)
        views = [m.torch()[i] for m, _ in self._parts]
        if len(views) == 1:
            return views[0]
        import torch
        return torch.cat(views)

    def prompt(self, index: int, layer: int):
        """Rows of prompt `index` at `layer`, a zero-copy view."""
        for mapped, lengths in self._parts:
            if index < len(lengths):
                start = sum(lengths[:index])
                return mapped.torch()[self.layers.index(layer), start:start + lengths[index]]
            index -= len(lengths)
        raise IndexError(index)


def harvest_batches(prompts: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Prompts in order, split into calls of at most max_tokens tokens each."""
    batches, current, size = [], [], 0
    for p in prompts:
        if current and size + len(p) > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(p)
        size += len(p)
    return batches + ([current] if current else [])
