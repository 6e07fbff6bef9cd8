"""Next-token choice on the device: greedy, or temperature/top-p with per-row parameters.

Random draws come from a counter-based hash of (request seed, position, token id), not from a
generator's state: a seeded request samples the same tokens whatever it is batched with, on any
device, in or out of a CUDA graph. Sampling is Gumbel-max over the top-p-filtered logits, which
draws exactly from softmax(logits / temperature) restricted to the nucleus.
"""
import torch

from djinnd.engine.to_device import to_device


def _int64(c: int) -> torch.Tensor:
    """A 64-bit constant as a signed int64 scalar tensor (torch has no uint64 arithmetic everywhere;
    a CPU scalar tensor joins CUDA ops as a kernel argument, with no copy)."""
    return torch.tensor(c - (1 << 64) if c >= 1 << 63 else c, dtype=torch.int64)


# splitmix64 constants
_GOLDEN, _MIX1 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9)
_MIX2, _POSITION = _int64(0x94D049BB133111EB), _int64(0x632BE59BD9B4E019)


def _shift_right(x, n: int):
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform_noise(seeds, positions, vocab_size: int):
    """[B, vocab] floats in (0, 1), a pure function of (seed, position, token id)."""
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = (seeds[:, None] * _GOLDEN + positions[:, None] * _POSITION) ^ (tokens[None, :] * _GOLDEN)
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).float() + 0.5) / float(1 << 24)


def first_argmax(logits, pieces: int = 64):
    """logits.argmax(-1) (the first of equal maxima) in two passes: one row's argmax over a 128k
    vocabulary runs on one thread block (29 us on the H200, 2026-12-02, profile_decode.py); cut in
    `pieces` it spreads over as many."""
    rows, vocab = logits.shape
    pieces = min(pieces, vocab & -vocab)          # a power of two that divides the vocabulary
    if pieces == 1:
        return logits.argmax(dim=-1)
    cut = logits.view(rows, pieces, vocab // pieces)
    inside = cut.argmax(dim=-1)                                      # [rows, pieces]
    piece = cut.gather(2, inside[..., None])[..., 0].argmax(dim=-1)   # the first piece holding the max
    return piece * (vocab // pieces) + inside.gather(1, piece[:, None])[:, 0]


def sample(logits, temperature, top_p, seeds, positions, any_random: bool = True, any_top_p: bool = True):
    """logits [B, vocab] float32; temperature/top_p [B] float32 (temperature 0: greedy); seeds and
    positions [B] int64, position = where the sampled token will sit. Returns [B] int64.
    any_random/any_top_p let an all-greedy or no-top-p batch skip the work it does not need."""
    greedy = first_argmax(logits)
    if not any_random:
        return greedy
    scaled = logits / temperature.clamp_min(1e-5)[:, None]
    if any_top_p:
        probs, order = torch.softmax(scaled, dim=-1).sort(dim=-1, descending=True)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]     # the most likely token always stays
        scaled = scaled.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, logits.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


class SamplingRows:
    """Per-row sampling parameters as device tensors, written when a row's request changes."""

    def __init__(self, max_rows: int, device):
        self.temperature = torch.zeros(max_rows, dtype=torch.float32, device=device)
        self.top_p = torch.ones(max_rows, dtype=torch.float32, device=device)
        self.seed = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.is_random = [False] * max_rows       # host copies: which work a step can skip
        self.has_top_p = [False] * max_rows

    def set_rows(self, rows: list[int], params: list, seeds: list[int]):
        if not rows:
            return
        device = self.temperature.device
        index = to_device(rows, device)
        self.temperature[index] = to_device([p.temperature for p in params], device)
        self.top_p[index] = to_device([p.top_p for p in params], device)
        self.seed[index] = to_device(seeds, device, torch.int64)
        for r, p in zip(rows, params):
            self.is_random[r], self.has_top_p[r] = p.temperature > 0, p.temperature > 0 and p.top_p < 1

    def move(self, src: int, dst: int):
        for t in (self.temperature, self.top_p, self.seed):
            t[dst] = t[src]
        self.is_random[dst], self.has_top_p[dst] = self.is_random[src], self.has_top_p[src]

    def sample(self, logits, positions, num_rows: int):
        return sample(logits, self.temperature[:num_rows], self.top_p[:num_rows], self.seed[:num_rows], positions,
                      any(self.is_random[:num_rows]), any(self.has_top_p[:num_rows]))
