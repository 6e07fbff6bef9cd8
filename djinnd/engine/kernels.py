"""Which kernels a forward uses: Triton on CUDA unless the config says torch; torch on CPU (and as
the reference the kernels are tested against)."""
import torch


def decode_attention_kernel(device, head_dim: int, backend: str, num_kv_heads: int = 1, max_context: int = 0):
    """The Triton split-K paged decode kernel, or None for the torch path. Its split count follows
    the batch size (one per CUDA-graph bucket) and the longest context the batch can hold."""
    if backend == "torch" or torch.device(device).type != "cuda":
        return None
    from djinnd.model import triton_attention
    if not triton_attention.supports(head_dim):
        if backend == "triton":
            raise ValueError(f"the Triton decode kernel needs a power-of-two head_dim, got {head_dim}")
        return None
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def attend(q, k_cache, v_cache, block_tables, context_lens):
        block_n = triton_attention.tile_for(k_cache.element_size(), q.shape[0])
        splits = triton_attention.num_splits_for(q.shape[0], num_kv_heads, max_context, num_sms, block_n)
        return triton_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, splits,
                                                       block_n)
    return attend


def prefill_attention_kernel(device, head_dim: int, backend: str):
    """The Triton paged prefill kernel (chunks attend to their paged context in place), or None for
    the torch path (a gather per session, then FlashAttention or SDPA)."""
    if backend == "torch" or torch.device(device).type != "cuda":
        return None
    from djinnd.model import triton_attention, triton_prefill
    if not triton_attention.supports(head_dim):
        return None                 # decode_attention_kernel has said why where "triton" was asked for
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def attend(q, k_cache, v_cache, meta):
        if meta.tiles is None:      # one plan per forward: every layer launches the same tiles
            meta.tiles = triton_prefill.plan(meta.query_lens, meta.context_lens, q.shape[1] // k_cache.shape[2],
                                             k_cache.shape[2], q.element_size(), q.device, num_sms)
        return triton_prefill.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.tiles)
    return attend


def fused_kernels(device, backend: str):
    """The module of fused norm/RoPE/SiLU kernels, or None for the torch path."""
    if backend == "torch" or torch.device(device).type != "cuda":
        return None
    from djinnd.model import triton_fused
    return triton_fused
