"""Seeded random-weight models in real shapes, for tests and benchmarks. Always labelled random:
honest for memory, bandwidth and latency, meaningless as text."""
import torch

from djinnd.model.llama import LlamaForCausalLM, ModelArgs
from djinnd.model.tp import shard_tensor

LLAMA3_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
               ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
              bos_token_id=128000, eos_token_ids=(128001, 128008, 128009), rope_scaling=LLAMA3_ROPE,
              torch_dtype="bfloat16")
QWEN = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=None, torch_dtype="bfloat16")

PRESETS = {
    "tiny": ModelArgs(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                      eos_token_ids=(2,)),
    "llama-2-7b": ModelArgs(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                            max_position_embeddings=4096, torch_dtype="float16"),
    "llama-2-13b": ModelArgs(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                             num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                             max_position_embeddings=4096, torch_dtype="float16"),
    "llama-2-34b": ModelArgs(vocab_size=32000, hidden_size=8192, intermediate_size=22016,   # CodeLlama-34B shapes
                             num_layers=48, num_heads=64, num_kv_heads=8, head_dim=128,
                             max_position_embeddings=4096, torch_dtype="float16"),
    "llama-3.2-1b": ModelArgs(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                              num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                              **{**LLAMA3, "rope_scaling": (("factor", 32.0),) + LLAMA3_ROPE[1:]}),
    "llama-3.1-8b": ModelArgs(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                              num_kv_heads=8, head_dim=128, **LLAMA3),
    "llama-3.1-70b": ModelArgs(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                               num_kv_heads=8, head_dim=128, **LLAMA3),
    "qwen2.5-7b": ModelArgs(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=32768,
                            eos_token_ids=(151645, 151643), model_type="qwen2", qkv_bias=True, **QWEN),
    "qwen2.5-32b": ModelArgs(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                             num_heads=40, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                             eos_token_ids=(151645, 151643), model_type="qwen2", qkv_bias=True, **QWEN),
    "qwen3-8b": ModelArgs(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                          num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=40960,
                          eos_token_ids=(151645, 151643), model_type="qwen3", qk_norm=True, **QWEN),
}


def build_random(name: str, seed: int, dtype, device, tp=None) -> LlamaForCausalLM:
    """Build on the meta device, then fill on the target device from one seeded generator. A
    tensor-parallel rank (tp) draws each full tensor in the same order and keeps its shard."""
    if name not in PRESETS:
        raise ValueError(f"unknown random preset {name!r}; known: {sorted(PRESETS)}")
    with torch.device("meta"):
        model = LlamaForCausalLM(PRESETS[name], tp)
        full = {n: p.shape for n, p in LlamaForCausalLM(PRESETS[name]).named_parameters()}
    model = model.to(dtype).to_empty(device=device)     # allocate in dtype: 34B in float32 would not fit
    gen = torch.Generator(device=device).manual_seed(seed)
    shard = (lambda pname, t: t) if tp is None else (lambda pname, t: shard_tensor(pname, t, PRESETS[name], tp))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            shape = full[pname]
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif pname.endswith(".bias"):
                p.copy_(shard(pname, torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                              .mul_(0.1).to(dtype)))
            else:  # std 1/sqrt(fan_in) keeps activations O(1), so greedy argmax is not a coin toss
                p.copy_(shard(pname, torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                              .mul_(shape[-1] ** -0.5).to(dtype)))
    model.tie_weights()
    return model.eval().requires_grad_(False)   # never trained: no autograd history on weight copies
