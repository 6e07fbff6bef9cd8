"""The torch decode path's single-session shortcut (cut at the context, no mask) gives what the
masked batched path gives that session, and never reads slots past its context."""
import torch

from djinnd.model.attention import decode_attention_torch


def test_one_session_equals_its_row_of_a_batch_and_ignores_slots_past_its_context():
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(8, 4, 2, 16, generator=g) for _ in range(2))     # blocks, slots, kv heads, dim
    q = torch.randn(2, 8, 16, generator=g)                                # GQA group 4
    tables, ctx = torch.tensor([[5, 1, 2], [3, 0, 0]]), torch.tensor([10, 3])
    batched = decode_attention_torch(q, k, v, tables, ctx, 3)
    for t in (k, v):
        t[2, 2:] = float("nan")                                           # past the first session's 10 tokens
    alone = decode_attention_torch(q[:1], k, v, tables[:1], ctx[:1], 3)
    assert torch.allclose(alone, batched[:1], atol=1e-6)
