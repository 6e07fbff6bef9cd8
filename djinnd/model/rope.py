"""Rotary position embeddings: the inverse frequencies of each scaling type HF configs name, the
cos/sin tables built from them once, and the rotation itself. Each type follows transformers'
`modeling_rope_utils` formula, so tables equal HF's (tested in fp32)."""
import math

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def check_rope(rope: dict) -> dict:
    """The config's rope scaling, with the keys its type needs; ValueError names what is missing."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported (only 1.0)")
    needs = {"default": (), "linear": ("factor",), "yarn": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [k for k in needs[kind] if rope.get(k) is None]
    if missing:
        raise ValueError(f"rope_type {kind!r} needs {', '.join(missing)}")
    return {**{k: v for k, v in rope.items() if k not in ("type", "rope_theta")}, "rope_type": kind}


def inv_freq(head_dim: int, theta: float, rope: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] in float32 and the factor cos/sin are scaled by."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return base / rope["factor"], 1.0
    if kind == "llama3":
        return _llama3(base, rope), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, rope, max_positions)
    return base, 1.0


def _llama3(base: torch.Tensor, rope: dict) -> torch.Tensor:
    """Long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > old_len / low, base / factor, base)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, blended, scaled)


def _yarn(head_dim: int, theta: float, rope: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """NTK-by-parts: interpolate the low frequencies, extrapolate the high, ramp between."""
    factor = rope["factor"]
    original = rope.get("original_max_position_embeddings") or max_positions

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate, attention


def rope_tables(max_positions: int, head_dim: int, theta: float, rope: dict, dtype, device):
    """cos/sin [max_positions, head_dim], computed once in float32 as HF does, then cast."""
    freq, scale = inv_freq(head_dim, theta, rope, max_positions)
    freqs = torch.arange(max_positions, device=device).float()[:, None] * freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):
    """x [T, heads, D]; cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
