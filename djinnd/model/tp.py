"""Tensor parallelism, the model's side: a rank's place in its group, the collectives a sharded
forward calls, and how each full weight splits into a rank's shard.

Q/K/V rows split by heads (each rank keeps whole KV heads, so the world divides num_kv_heads),
gate/up rows and o/down columns split evenly, embedding and lm_head rows split by vocabulary
(padded to a multiple of the world). Norms and o_proj's bias are replicated. A rank's shard is
a slice of the full tensor, so TP=N holds exactly the TP=1 weights.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from djinnd.model.llama import FUSED, ModelArgs, _pieces, _vocab_rows

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # renamed in torch 2.13


class RankLost(BaseException):
    """A collective failed: a rank died, or the ranks fell out of step. They cannot go on together,
    so this passes the engine's per-step fault boundary (which catches Exception) and stops it."""


def _collective(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        raise RankLost(f"a tensor-parallel collective failed: {' '.join(str(e).split())[:300]}") from None


@dataclass(frozen=True)
class TP:
    rank: int
    world: int
    group: object = None          # a torch.distributed process group; None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        _collective(dist.all_reduce, x, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x into every rank's x, in place."""
        _collective(dist.broadcast, x, src=0, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, k] on each rank -> [N, world * k], rank 0's columns first."""
        parts = torch.empty((self.world * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        _collective(_all_gather, parts, x.contiguous(), group=self.group)
        return parts.view(self.world, *x.shape).permute(1, 0, 2).reshape(x.shape[0], -1)


def check_divides(a: ModelArgs, world: int) -> str | None:
    """Why this model cannot be split over `world` ranks, in one line, or None."""
    for key, value in (("num_key_value_heads", a.num_kv_heads), ("num_attention_heads", a.num_heads),
                       ("intermediate_size", a.intermediate_size)):
        if value % world:
            return (f"--tensor-parallel {world} must divide the model's {key} ({value}): each rank holds whole "
                    f"KV heads; try " + " or ".join(str(n) for n in range(1, value + 1)
                                                   if a.num_kv_heads % n == 0 and a.num_heads % n == 0
                                                   and a.intermediate_size % n == 0 and n <= 8))
    return None


def _kind(name: str) -> str:
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return "vocab"
    if any(f".{f}." in name for f in FUSED):
        return "fused"
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return "columns"
    return "replicated"


def shard_tensor(name: str, full: torch.Tensor, a: ModelArgs, tp: TP) -> torch.Tensor:
    """Rank tp.rank's shard of parameter `name` (our fused names) from its full tensor."""
    kind, r, n = _kind(name), tp.rank, tp.world
    if kind == "vocab":
        rows = _vocab_rows(a, tp)
        out = full.new_zeros((rows, *full.shape[1:]))
        piece = full[r * rows:(r + 1) * rows]
        out[:piece.shape[0]] = piece
        return out
    if kind == "fused":
        fused = next(f for f in FUSED if f".{f}." in name)
        return torch.cat([full[start:start + rows].chunk(n)[r] for _, start, rows in _pieces(a, fused)])
    if kind == "columns":
        return full.chunk(n, dim=1)[r]
    return full


def read_shard(key: str, name: str, start: int, rows: int | None, file, param: torch.Tensor, a: ModelArgs,
               tp: TP) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Read only this rank's slice of checkpoint tensor `key` (safetensors get_slice). Returns (the
    slice, the view of `param` it goes into, rows of `param` it accounts for)."""
    kind, r, n = _kind(name), tp.rank, tp.world
    if rows is not None:                         # a q/k/v or gate/up piece of a fused parameter
        part = rows // n
        return file.get_slice(key)[r * part:(r + 1) * part], param[start // n:start // n + part], part
    if kind == "vocab":
        per = param.shape[0]
        lo, hi = r * per, min((r + 1) * per, a.vocab_size)
        param[hi - lo:].zero_()                  # padding rows past the vocabulary
        return file.get_slice(key)[lo:hi], param[:hi - lo], per
    if kind == "columns":
        cols = param.shape[1]
        return file.get_slice(key)[:, r * cols:(r + 1) * cols], param, param.shape[0]
    return file.get_tensor(key), param, param.shape[0]
