"""The fused RoPE + K/V-write kernel, run by Triton's interpreter on CPU tensors, does what the torch
path does (`rope.apply_rope` on q and k, then `attention.write_kv`): q and k rotated in place inside
the projection's output, k and v in their slots and nowhere else. Skipped where Triton is not
installed, and on CUDA machines (tests/test_gpu_kernels.py runs the compiled kernel there, with an
fp8 cache too)."""
import json

from conftest import require_triton_interpreter, run_interpreted

require_triton_interpreter("the compiled kernel is tested in test_gpu_kernels.py")

CHILD = """
import json, sys, torch
from djinnd.model.attention import write_kv
from djinnd.model.rope import apply_rope, rope_tables
from djinnd.model.triton_fused import rope_write_kv
errors = []
for heads, kv_heads in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(heads)
    tokens, dim, block_size = 5, 32, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    slots = torch.randperm(6 * block_size, generator=g)[:tokens]
    cos, sin = rope_tables(64, dim, 10000.0, {}, torch.float32, "cpu")
    positions = torch.randint(0, 64, (tokens,), generator=g)
    cos, sin = cos[positions][:, None], sin[positions][:, None]
    out = {}
    for path in ("torch", "kernel"):
        x = qkv.clone()
        caches = torch.zeros(2, 6, block_size, kv_heads, dim)
        q, k, v = (t.view(tokens, -1, dim) for t in x.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
        if path == "kernel":
            rope_write_kv(q, k, v, cos, sin, caches[0], caches[1], slots)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            write_kv(k, v, caches[0], caches[1], slots)
        out[path] = torch.cat([q.flatten(), k.flatten(), caches.flatten()])
    errors.append((out["kernel"] - out["torch"]).abs().max().item())
print(json.dumps(errors))
"""


def test_rope_and_kv_write_kernel_equals_the_torch_path():
    errors = run_interpreted(CHILD, json.dumps([(4, 4), (8, 2), (6, 1)]))
    assert max(errors) < 1e-5, errors
