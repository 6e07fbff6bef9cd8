"""One Llama-family model (Llama 2/3, Mistral, SmolLM) over the paged KV cache.

Q/K/V and gate/up projections are fused at load (one matmul each); `hf_state_dict` gives the
HF-named tensors back as views of the fused ones, so tests and attached processes can load our
weights into HF's LlamaForCausalLM without a copy. How attention reads the KV cache (prefill or
decode, torch or kernel) is the forward context's business, not the model's.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple = (2,)

    @classmethod
    def from_hf(cls, c: dict) -> "ModelArgs":
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {rope['rope_type']!r} is not supported yet")
        eos = c.get("eos_token_id")
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
            num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    def to_hf(self) -> dict:
        return dict(
            model_type="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids), attention_bias=False, mlp_bias=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(max_positions: int, head_dim: int, theta: float, dtype, device):
    """cos/sin [max_positions, head_dim], computed once in float32 as HF does, then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [T, heads, D]; cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.sizes = [a.q_size, a.kv_size, a.kv_size]
        self.qkv_proj = nn.Linear(a.hidden_size, sum(self.sizes), bias=False)
        self.o_proj = nn.Linear(a.q_size, a.hidden_size, bias=False)

    def forward(self, x, ctx, k_cache, v_cache):
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        if ctx.fused is not None:        # rotates q and k in place, in one kernel each
            q, k = ctx.fused.rope_(q, ctx.cos, ctx.sin), ctx.fused.rope_(k, ctx.cos, ctx.sin)
        else:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        out = ctx.attend(q, k, v.view(-1, self.num_kv_heads, self.head_dim), k_cache, v_cache)
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x, fused=None):
        if fused is not None:
            return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, ctx, k_cache, v_cache):
        f = ctx.fused
        if f is None:
            x = x + self.self_attn(self.input_layernorm(x), ctx, k_cache, v_cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        a = self.self_attn(f.rms_norm(x, self.input_layernorm.weight, self.input_layernorm.eps), ctx, k_cache, v_cache)
        h = f.rms_norm(a, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps, residual=x)  # x += a
        return x + self.mlp(h, f)


class LlamaModel(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = LlamaModel(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.streamer = None        # set for weight streaming: makes layer i's weights resident
        self._rope = None

    def tie_weights(self):
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def rope(self, positions, dtype):
        """cos/sin [T, 1, head_dim] for each token's position, from tables built once."""
        if self._rope is None or self._rope[0].dtype != dtype:
            a = self.args
            self._rope = rope_tables(a.max_position_embeddings, a.head_dim, a.rope_theta, dtype, positions.device)
        cos, sin = self._rope
        return cos[positions][:, None], sin[positions][:, None]

    def run_layers(self, h, ctx, k_cache, v_cache, start: int = 0, stop: int | None = None):
        """Layers [start, stop) over hidden states h [T, hidden]; k_cache/v_cache [L, blocks, ...]."""
        for i in range(start, self.args.num_layers if stop is None else stop):
            if self.streamer is not None:
                self.streamer.before_layer(i)
            h = self.model.layers[i](h, ctx, k_cache[i], v_cache[i])
            if self.streamer is not None:
                self.streamer.after_layer(i)
        return h

    def logits(self, h):
        """Logits [N, vocab] in float32 of hidden states h [N, hidden] (after the last layer)."""
        return self.lm_head(self.model.norm(h)).float()


# ---- HF names <-> fused parameters ---------------------------------------------------------
FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def _fused_sizes(a: ModelArgs, fused: str) -> list[int]:
    return [a.q_size, a.kv_size, a.kv_size] if fused.endswith("qkv_proj") else [a.intermediate_size] * 2


def hf_state_dict(model: LlamaForCausalLM) -> dict:
    """HF-named tensors; q/k/v and gate/up are row slices (views) of the fused weights."""
    out = {}
    for name, tensor in model.state_dict().items():
        fused = next((f for f in FUSED if name.endswith(f + ".weight")), None)
        if fused is None:
            out[name] = tensor
            continue
        prefix = name[:-len(fused + ".weight")] + fused.split(".")[0]
        for part, piece in zip(FUSED[fused], tensor.split(_fused_sizes(model.args, fused))):
            out[f"{prefix}.{part}.weight"] = piece
    return out


def fuse_hf_state(state: dict, a: ModelArgs) -> dict:
    """HF-named weights -> this model's names, concatenating q/k/v and gate/up."""
    out = dict(state)
    for i in range(a.num_layers):
        for fused, parts in FUSED.items():
            module, prefix = fused.split(".")[0], f"model.layers.{i}."
            names = [f"{prefix}{module}.{p}.weight" for p in parts]
            if all(n in out for n in names):
                out[f"{prefix}{fused}.weight"] = torch.cat([out.pop(n) for n in names])
    return out
