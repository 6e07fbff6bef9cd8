"""The split-K paged decode kernel, run by Triton's interpreter on CPU tensors, equals the torch
reference on ragged random block tables (fp32; GQA groups 1, 4, 8; one slice, a few, and more
slices than a short context has tiles; pages that tile the key tiles and pages that do not).
Skipped where Triton is not installed, and on CUDA machines (tests/test_gpu_kernels.py runs the
compiled kernel there). The interpreter is chosen when Triton is
imported, so the kernels run in a child process of their own."""
import json

from conftest import require_triton_interpreter, run_interpreted

require_triton_interpreter("the compiled kernel is tested in test_gpu_kernels.py")

CASES = [(4, 4, 1, 64, 16), (4, 4, 5, 64, 16), (8, 2, 3, 64, 16), (16, 2, 8, 64, 16), (8, 2, 3, 128, 16),
         (8, 2, 3, 64, 24), (8, 2, 3, 64, 128)]        # heads, KV heads, slices, tile, page tokens
CHILD = """
import json, sys, torch
from djinnd.model.attention import decode_attention_torch
from djinnd.model.triton_attention import paged_decode_attention
lens, head_dim = [1, 15, 16, 17, 100, 513], 32
errors = []
for heads, kv_heads, num_splits, block_n, block_size in json.loads(sys.argv[1]):
    num_blocks = 5 * (-(-max(lens) // block_size)) + 4
    g = torch.Generator().manual_seed(heads * 100 + num_splits)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    width = -(-max(lens) // block_size) + 2          # tables padded past the longest context
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens]).int()
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    ctx = torch.tensor(lens, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=num_splits, block_n=block_n)
    ref = decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), tables, ctx, width)
    errors.append(((out.double() - ref).norm() / ref.norm()).item())
print(json.dumps(errors))
"""


def test_split_kernel_equals_the_torch_reference():
    errors = run_interpreted(CHILD, json.dumps(CASES))
    assert all(e < 1e-5 for e in errors), dict(zip(map(str, CASES), errors))


def test_split_count_fills_the_gpu_and_keeps_slices_long():
    from djinnd.model.triton_attention import num_splits_for
    assert num_splits_for(1, 8, 131072, 132) == 64           # about 4 programs per SM at batch 1
    assert num_splits_for(4, 8, 131072, 132) == 17
    assert num_splits_for(64, 8, 131072, 132) == 2
    assert num_splits_for(1, 8, 512, 132) == 2               # no slice under 4 tiles of 64
    assert num_splits_for(1, 8, 100, 132) == 1
