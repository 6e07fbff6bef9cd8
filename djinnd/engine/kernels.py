"""Which kernels a forward uses: Triton on CUDA unless the config says torch; torch on CPU (and as
the reference the kernels are tested against)."""
import torch


def decode_attention_kernel(device, head_dim: int, backend: str):
    """The Triton paged decode kernel, or None for the torch path."""
    if backend == "torch" or torch.device(device).type != "cuda":
        return None
    from djinnd.model import triton_attention
    if not triton_attention.supports(head_dim):
        if backend == "triton":
            raise ValueError(f"the Triton decode kernel needs a power-of-two head_dim, got {head_dim}")
        return None
    return triton_attention.paged_decode_attention


def fused_kernels(device, backend: str):
    """The module of fused norm/RoPE/SiLU kernels, or None for the torch path."""
    if backend == "torch" or torch.device(device).type != "cuda":
        return None
    from djinnd.model import triton_fused
    return triton_fused
