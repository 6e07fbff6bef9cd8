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


def test_an_fp8_cache_is_written_saturated_and_read_within_fp8_precision():
    """The K/V written into an fp8_e4m3 cache and read back by decode and prefill attention give
    the fp32 cache's outputs within 5% (e4m3 keeps 3 mantissa bits); values past 448 saturate."""
    from djinnd.model.attention import build_prefill_metadata, prefill_attention, write_kv
    g = torch.Generator().manual_seed(1)
    caches = {dt: (torch.zeros(8, 4, 2, 16, dtype=dt), torch.zeros(8, 4, 2, 16, dtype=dt))
              for dt in (torch.float32, torch.float8_e4m3fn)}
    k, v, q = (torch.randn(14, heads, 16, generator=g) for heads in (2, 2, 8))
    k[0, 0, 0] = 1e4                                                      # past e4m3's range
    table, outs = [3, 0, 6, 1], {}
    for dt, (kc, vc) in caches.items():
        first = build_prefill_metadata([10], [10], [table], 4, "cpu")
        second = build_prefill_metadata([4], [14], [table], 4, "cpu")
        write_kv(k[:10], v[:10], kc, vc, first.slot_mapping)
        write_kv(k[10:], v[10:], kc, vc, second.slot_mapping)
        chunk = prefill_attention(q[10:], k[10:], v[10:], kc, vc, second)
        decode = decode_attention_torch(q[13:], kc, vc, torch.tensor([table]), torch.tensor([14]), 4)
        outs[dt] = torch.cat([chunk, decode])
    assert caches[torch.float8_e4m3fn][0][3, 0, 0, 0].float() == 448.0
    fp32, fp8 = outs[torch.float32], outs[torch.float8_e4m3fn]
    err = ((fp8 - fp32).norm() / fp32.norm()).item()
    assert fp8.isfinite().all() and 0 < err < 0.05, err
