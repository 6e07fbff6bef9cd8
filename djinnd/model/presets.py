"""Seeded random-weight models in real shapes, for tests and benchmarks. Always labelled random:
honest for memory, bandwidth and latency, meaningless as text."""
import torch

from djinnd.model.llama import LlamaForCausalLM, ModelArgs

PRESETS = {
    "tiny": ModelArgs(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                      eos_token_ids=(2,)),
    "llama-2-7b": ModelArgs(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                            max_position_embeddings=4096),
    "llama-2-13b": ModelArgs(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                             num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                             max_position_embeddings=4096),
    "llama-2-34b": ModelArgs(vocab_size=32000, hidden_size=8192, intermediate_size=22016,   # CodeLlama-34B shapes
                             num_layers=48, num_heads=64, num_kv_heads=8, head_dim=128,
                             max_position_embeddings=4096),
}


def build_random(name: str, seed: int, dtype, device) -> LlamaForCausalLM:
    """Build on the meta device, then fill on the target device from one seeded generator."""
    if name not in PRESETS:
        raise ValueError(f"unknown random preset {name!r}; known: {sorted(PRESETS)}")
    with torch.device("meta"):
        model = LlamaForCausalLM(PRESETS[name])
    model = model.to(dtype).to_empty(device=device)     # allocate in dtype: 34B in float32 would not fit
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # std 1/sqrt(fan_in) keeps activations O(1), so greedy argmax is not a coin toss
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
                        .mul_(p.shape[-1] ** -0.5).to(dtype))
    model.tie_weights()
    return model.eval().requires_grad_(False)   # never trained: no autograd history on weight copies
