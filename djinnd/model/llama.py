"""One Llama-family model (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM) over the paged KV cache;
the families' differences are named options of ModelArgs read from config.json.

Q/K/V and gate/up projections are fused at load (one matmul each); `hf_state_dict` gives the
HF-named tensors back as views of the fused ones, so tests and attached processes can load our
weights into the family's transformers class without a copy. How attention reads the KV cache (prefill or
decode, torch or kernel) is the forward context's business, not the model's.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from djinnd.model import threaded_linear
from djinnd.model.attention import write_kv
from djinnd.model.rope import apply_rope, check_rope, rope_tables

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")   # HF model_type values this one model serves


class UnsupportedModel(ValueError):
    """A config.json this model cannot serve; the message names the key and its value."""


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
    model_type: str = "llama"     # the HF family: which transformers class hf_model() builds
    rope_scaling: tuple = ()      # the config's rope scaling as sorted (key, value) pairs; () for none
    qkv_bias: bool = False        # Qwen2 (and Llama's attention_bias): biases on q, k and v
    o_bias: bool = False          # Llama's and Qwen3's attention_bias also bias o_proj
    qk_norm: bool = False         # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None = None   # Mistral v0.1: attention reaches this far back; contexts stay within it
    torch_dtype: str | None = None      # the checkpoint's dtype, from config.json

    @classmethod
    def from_hf(cls, c: dict) -> "ModelArgs":
        """From a config.json; UnsupportedModel names the key of anything this model cannot serve."""
        family = c.get("model_type", "llama")
        _check_supported(c, family)
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        try:
            rope = check_rope(rope)
        except ValueError as e:
            raise UnsupportedModel(f"config.json rope scaling: {e}") from None
        eos = c.get("eos_token_id")
        heads = c["num_attention_heads"]
        bias = bool(c.get("attention_bias", False))
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
            num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=(c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0)),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            model_type=family,
            rope_scaling=tuple(sorted(rope.items())) if rope["rope_type"] != "default" else (),
            qkv_bias=family == "qwen2" or bias, o_bias=bias and family != "qwen2",
            qk_norm=family == "qwen3", sliding_window=_sliding_window(c, family),
            torch_dtype=c.get("dtype") or c.get("torch_dtype"),
        )

    def to_hf(self) -> dict:
        """A config dict for this family's transformers class (AutoConfig.for_model(**it))."""
        out = dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids))
        if self.rope_scaling:
            out["rope_scaling"] = {**dict(self.rope_scaling), "rope_theta": self.rope_theta}
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.o_bias
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def window(self) -> int:
        """The longest context this model serves: its position window, or a shorter sliding window
        (within which sliding-window attention equals full attention)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _check_supported(c: dict, family: str):
    def refuse(key, why):
        raise UnsupportedModel(f"config.json {key} = {c.get(key)!r}: {why}")
    if family not in FAMILIES:
        refuse("model_type", f"not supported; djinnd serves {', '.join(FAMILIES)} (Llama 2/3, Mistral, "
                             "Qwen2/2.5, Qwen3, SmolLM)")
    if c.get("quantization_config"):
        method = c["quantization_config"].get("quant_method", "?") if isinstance(c["quantization_config"], dict) else "?"
        raise UnsupportedModel(f"config.json quantization_config (quant_method {method!r}): quantized "
                               "checkpoints are not supported; use a bf16/fp16 checkpoint")
    if any(k in c for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise UnsupportedModel("config.json num_experts: mixture-of-experts models are not supported")
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only silu is supported")
    if c.get("mlp_bias"):
        refuse("mlp_bias", "MLP biases are not supported")


def _sliding_window(c: dict, family: str) -> int | None:
    window = c.get("sliding_window")
    if family.startswith("qwen"):
        if c.get("use_sliding_window"):
            raise UnsupportedModel(f"config.json use_sliding_window = true (sliding_window {window}): "
                                   "sliding-window attention is not supported")
        return None
    return window if family == "mistral" and window and window < c.get("max_position_embeddings", 4096) else None


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


def _world(tp) -> int:
    return 1 if tp is None else tp.world


def product(fused):
    """The linear layers' product: the fused kernels' (a Triton GEMV for one row on CUDA) or
    threaded_linear's (CPU decode)."""
    return threaded_linear.linear if fused is None else fused.linear


def row_parallel(linear: nn.Linear, x, tp, fused=None):
    """o_proj, down_proj: under tensor parallelism each rank holds some input columns, so its product
    is a partial sum, summed across ranks (then the bias, once). tp None: the plain layer."""
    if tp is None:
        return product(fused)(x, linear.weight, linear.bias)
    y = tp.all_reduce(product(fused)(x, linear.weight))
    return y if linear.bias is None else y + linear.bias


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, tp=None):
        super().__init__()
        world = _world(tp)           # each rank: its share of the heads (model/tp.py)
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads // world, a.num_kv_heads // world, a.head_dim
        self.sizes = [a.q_size // world, a.kv_size // world, a.kv_size // world]
        self.qkv_proj = nn.Linear(a.hidden_size, sum(self.sizes), bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.q_size // world, a.hidden_size, bias=a.o_bias)
        self.tp = tp
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None

    def forward(self, x, ctx, k_cache, v_cache):
        q, k, v = product(ctx.fused)(x, self.qkv_proj.weight, self.qkv_proj.bias).split(self.sizes, dim=-1)
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:      # Qwen3: each head normalized before rotation
            q, k = self._head_norm(self.q_norm, q, ctx.fused), self._head_norm(self.k_norm, k, ctx.fused)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if ctx.fused is not None:        # rotates q and k in place and writes k and v, in one kernel
            ctx.fused.rope_write_kv(q, k, v, ctx.cos, ctx.sin, k_cache, v_cache, ctx.slots)
        else:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
            write_kv(k, v, k_cache, v_cache, ctx.slots)
        out = ctx.attend(q, k, v, k_cache, v_cache)
        return row_parallel(self.o_proj, out.reshape(x.shape[0], -1), self.tp, ctx.fused)

    @staticmethod
    def _head_norm(norm, x, fused):
        """x [T, heads, D] -> RMSNorm over D, one row per (token, head)."""
        if fused is None:
            return norm(x)
        return fused.rms_norm(x.reshape(-1, x.shape[-1]), norm.weight, norm.eps).view(x.shape)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs, tp=None):
        super().__init__()
        columns = a.intermediate_size // _world(tp)
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * columns, bias=False)
        self.down_proj = nn.Linear(columns, a.hidden_size, bias=False)
        self.tp = tp

    def forward(self, x, fused=None):
        if fused is not None:
            return row_parallel(self.down_proj, fused.silu_mul(fused.linear(x, self.gate_up_proj.weight)), self.tp,
                                fused)
        gate, up = threaded_linear.linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        return row_parallel(self.down_proj, F.silu(gate) * up, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, tp)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a, tp)

    def forward(self, x, ctx, k_cache, v_cache, pending=None):
        """Returns (x, pending): the layer's output is x + pending. With the fused kernels the MLP's
        output stays pending, and the next layer adds it in its first norm's kernel; pending (the
        previous layer's, or None) is added to x in place here. Without them pending is None."""
        f = ctx.fused
        if f is None:
            x = x + self.self_attn(self.input_layernorm(x), ctx, k_cache, v_cache)
            return x + self.mlp(self.post_attention_layernorm(x)), None
        norm, post = self.input_layernorm, self.post_attention_layernorm
        normed = f.rms_norm(x, norm.weight, norm.eps) if pending is None else \
            f.rms_norm(pending, norm.weight, norm.eps, residual=x)                  # x += pending
        a = self.self_attn(normed, ctx, k_cache, v_cache)
        h = f.rms_norm(a, post.weight, post.eps, residual=x)                        # x += a
        return x, self.mlp(h, f)


class LlamaModel(nn.Module):
    def __init__(self, a: ModelArgs, tp=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(_vocab_rows(a, tp), a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a, tp) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


def _vocab_rows(a: ModelArgs, tp) -> int:
    """Embedding and lm_head rows: the vocabulary, or under tensor parallelism a rank's share of it."""
    return a.vocab_size if tp is None else -(-a.vocab_size // tp.world)


class LlamaForCausalLM(nn.Module):
    def __init__(self, a: ModelArgs, tp=None):
        """tp: this rank's place in a tensor-parallel group (model/tp.py), or None for the whole model."""
        super().__init__()
        self.args, self.tp = a, tp
        self.model = LlamaModel(a, tp)
        self.lm_head = nn.Linear(a.hidden_size, _vocab_rows(a, tp), bias=False)
        self.streamer = None        # set for weight streaming: makes layer i's weights resident
        self._rope = None

    def tie_weights(self):
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids):
        if self.tp is None:
            return self.model.embed_tokens(input_ids)
        rows = self.model.embed_tokens.num_embeddings    # vocab-parallel: ids outside the shard give 0
        local = input_ids - self.tp.rank * rows
        inside = (local >= 0) & (local < rows)
        h = self.model.embed_tokens(local.clamp(0, rows - 1)).masked_fill(~inside[..., None], 0)
        return self.tp.all_reduce(h)

    def rope(self, positions, dtype):
        """cos/sin [T, 1, head_dim] for each token's position, from tables built once."""
        if self._rope is None or self._rope[0].dtype != dtype:
            a = self.args
            self._rope = rope_tables(a.max_position_embeddings, a.head_dim, a.rope_theta, a.rope, dtype,
                                     positions.device)
        cos, sin = self._rope
        return cos[positions][:, None], sin[positions][:, None]

    def run_layers(self, h, ctx, k_cache, v_cache, start: int = 0, stop: int | None = None, after=None):
        """Layers [start, stop) over hidden states h [T, hidden]; k_cache/v_cache [L, blocks, ...].
        after(i, h) -> h, if given, sees (and may replace) each layer's output: steering, capture."""
        pending = None               # the last layer's MLP output, not yet added to h (DecoderLayer)
        for i in range(start, self.args.num_layers if stop is None else stop):
            if self.streamer is not None:
                self.streamer.before_layer(i)
            h, pending = self.model.layers[i](h, ctx, k_cache[i], v_cache[i], pending)
            if self.streamer is not None:
                self.streamer.after_layer(i)
            if after is not None:
                h, pending = after(i, h + pending if pending is not None else h), None
        return h if pending is None else h + pending

    def logits(self, h):
        """Logits [N, vocab] in float32 of hidden states h [N, hidden] (after the last layer)."""
        logits = threaded_linear.linear(self.model.norm(h), self.lm_head.weight).float()
        if self.tp is None:
            return logits
        return self.tp.all_gather_columns(logits)[:, :self.args.vocab_size]


# ---- HF names <-> fused parameters ---------------------------------------------------------
FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def _pieces(a: ModelArgs, fused: str) -> list[tuple[str, int, int]]:
    """(HF part, first row, rows) of each piece of a fused weight or bias."""
    sizes = [a.q_size, a.kv_size, a.kv_size] if fused.endswith("qkv_proj") else [a.intermediate_size] * 2
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(FUSED[fused], starts, sizes))


def hf_to_fused(name: str, a: ModelArgs) -> tuple[str, int, int] | None:
    """An HF name of a q/k/v or gate/up weight or bias -> (our fused name, first row, rows)."""
    for fused in FUSED:
        module = fused.split(".")[0]
        for part, start, rows in _pieces(a, fused):
            if f".{module}.{part}." in name:
                return name.replace(f".{module}.{part}.", f".{fused}."), start, rows
    return None


def hf_state_dict(model: LlamaForCausalLM) -> dict:
    """HF-named tensors; q/k/v and gate/up are row slices (views) of the fused weights and biases."""
    out = {}
    for name, tensor in model.state_dict().items():
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = tensor
            continue
        module = fused.split(".")[0]
        for part, start, rows in _pieces(model.args, fused):
            out[name.replace(f".{fused}.", f".{module}.{part}.")] = tensor[start:start + rows]
    return out
