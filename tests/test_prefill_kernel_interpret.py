"""The paged prefill kernel, run by Triton's interpreter on CPU tensors, equals the torch path of
`prefill_attention` (gather, then SDPA per session) on ragged chunks over random block tables: fresh
chunks beside chunks after a prefix, one-token chunks, GQA groups 1, 4 and 7 (more rows than a group
fills), one key slice and several. Skipped where Triton is not installed, and on CUDA machines
(tests/test_gpu_kernels.py runs the compiled kernel there)."""
import json

from conftest import require_triton_interpreter, run_interpreted

require_triton_interpreter("the compiled kernel is tested in test_gpu_kernels.py")

CASES = [(4, 4, None), (8, 2, 2), (7, 1, 5)]        # heads, KV heads, slices (None: planned)
CHILD = """
import json, sys, torch
from djinnd.model.attention import build_prefill_metadata, prefill_attention, write_kv
from djinnd.model import triton_prefill
chunks, contexts, block_size, head_dim = [5, 40, 1, 33], [20, 150, 140, 33], 4, 32
errors = []
for heads, kv_heads, splits in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    num_blocks = sum(-(-c // block_size) for c in contexts) + 3
    order, tables = torch.randperm(num_blocks, generator=g).tolist(), []
    for c in contexts:
        tables.append(order[:-(-c // block_size)])
        order = order[len(tables[-1]):]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(sum(chunks), heads, head_dim, generator=g)
    k = torch.randn(sum(chunks), kv_heads, head_dim, generator=g)
    v = torch.randn(sum(chunks), kv_heads, head_dim, generator=g)
    meta = build_prefill_metadata(chunks, contexts, tables, block_size, "cpu")
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)       # the kernel reads the chunk's own K/V there
    ref = prefill_attention(q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), meta)
    tiles = triton_prefill.plan(chunks, contexts, heads // kv_heads, kv_heads, 4, "cpu", num_sms=2)
    tiles.num_splits = splits or tiles.num_splits
    out = triton_prefill.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, tiles, num_warps=4)
    errors.append([tiles.num_splits, ((out.double() - ref).norm() / ref.norm()).item()])
print(json.dumps(errors))
"""


def test_prefill_kernel_equals_the_torch_path():
    results = run_interpreted(CHILD, json.dumps(CASES))
    assert all(e < 1e-5 for _, e in results), dict(zip(map(str, CASES), results))


def test_plan_splits_short_chunks_over_long_prefixes_only():
    from djinnd.model.triton_prefill import plan
    short = plan([32], [16384 + 32], 4, 8, 2, "cpu", num_sms=132)      # 1 tile x 8 heads: split the keys
    assert short.num_splits == 33 and short.tokens == 32
    one_round = plan([256], [16384 + 256], 4, 8, 2, "cpu", num_sms=132)   # 8 tiles x 8 heads x 4: 256 of 264
    assert one_round.num_splits == 4
    long = plan([2048], [32768], 4, 8, 2, "cpu", num_sms=132)         # 64 tiles x 8 heads fill the GPU
    assert long.num_splits == 1
    assert plan([32], [64], 4, 8, 2, "cpu", num_sms=132).num_splits == 1   # too few keys to split
    group7 = plan([40, 3], [100, 3], 7, 4, 4, "cpu", num_sms=132)     # fp32: 64 rows hold 9 tokens of 7 heads
    assert group7.tokens == 9 and group7.tile_seq.tolist() == [0] * 5 + [1]
