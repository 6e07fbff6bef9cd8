"""On CUDA: the split-K paged decode kernel equals the torch reference (and the one-pass kernel it
replaced, kept here as a second reference) on ragged random block tables up to 64k tokens, fp32 and
bf16, GQA groups 1, 4 and 8; and a CUDA graph of it replays correctly for other contexts and tables."""
import pytest
import torch

from djinnd.model.attention import decode_attention_torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from djinnd.model.triton_attention import num_splits_for, paged_decode_attention, tile_for  # noqa: E402

NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def _one_pass_decode(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_lens_ptr, out_ptr,
                     stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb, stride_ob, stride_oh,
                     scale, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
    """The kernel before split-K: one program per (session, query head), the whole context."""
    b, h = tl.program_id(0), tl.program_id(1)
    kv_head = h // GROUP
    ctx = tl.load(ctx_lens_ptr + b)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < ctx
        block = tl.load(tables_ptr + b * stride_tb + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, (acc / l).to(out_ptr.dtype.element_ty))


def one_pass_decode(q, k_cache, v_cache, block_tables, context_lens):
    batch, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    _one_pass_decode[(batch, num_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), head_dim ** -0.5,
        GROUP=num_heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1], BLOCK_N=64, HEAD_DIM=head_dim, num_warps=4)
    return out


def ragged_case(lens, kv_heads, group, dtype, head_dim=128, block_size=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = -(-max(lens) // block_size)
    num_blocks = width + 64
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", generator=g).to(dtype)
    v_cache = torch.randn(shape, device="cuda", generator=g).to(dtype)
    tables = torch.stack([torch.randperm(num_blocks, device="cuda", generator=g)[:width + 4] for _ in lens]).int()
    q = torch.randn(len(lens), kv_heads * group, head_dim, device="cuda", generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, device="cuda", dtype=torch.int32), width


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,group", [(8, 1), (8, 4), (4, 8)])
def test_split_kernel_equals_the_references_up_to_64k(dtype, kv_heads, group):
    lens = [1, 17, 1000, 4097, 32768, 65536]
    q, k_cache, v_cache, tables, ctx, width = ragged_case(lens, kv_heads, group, dtype)
    ref = decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), tables, ctx, width)
    one_pass = one_pass_decode(q, k_cache, v_cache, tables, ctx)
    assert rel_err(one_pass, ref) < TOL[dtype]
    for block_n in (64, tile_for(q.element_size(), 32)):    # the tiles the engine uses at b1 and b32
        for splits in (1, num_splits_for(len(lens), kv_heads, 65536, NUM_SMS, block_n), 256):
            out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, splits, block_n)
            assert rel_err(out, ref) < TOL[dtype], (block_n, splits, rel_err(out, ref))


def test_a_graph_of_the_split_kernel_replays_for_other_contexts_and_tables():
    q, k_cache, v_cache, tables, ctx, width = ragged_case([5, 300, 9000], 8, 4, torch.bfloat16)
    splits = num_splits_for(3, 8, 16384, NUM_SMS)
    assert splits > 1
    out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, splits)     # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, splits)
    for lens, seed in (([9000, 1, 4000], 1), ([64, 8999, 2], 2)):
        q2, _, _, tables2, ctx2, _ = ragged_case(lens, 8, 4, torch.bfloat16, seed=seed)
        tables2 = tables2[:, :tables.shape[1]] % k_cache.shape[0]
        q.copy_(q2), tables.copy_(tables2), ctx.copy_(ctx2)
        graph.replay()
        ref = decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), tables, ctx, width)
        assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("prefix,chunk", [(0, 700), (16384, 512), (24000, 1024)])
def test_prefill_chunk_over_a_long_paged_prefix_equals_the_reference(prefix, chunk):
    """bf16, GQA group 4: the chunk attends to its prefix through the block table, bottom-right causal."""
    from djinnd.model.attention import build_prefill_metadata, prefill_attention, write_kv
    from torch.nn.attention.bias import causal_lower_right
    g = torch.Generator(device="cuda").manual_seed(3)
    block_size, kv_heads, heads, head_dim, ctx = 16, 8, 32, 128, prefix + chunk
    num_blocks = -(-ctx // block_size) + 8
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    table = torch.randperm(num_blocks, device="cuda", generator=g)[:-(-ctx // block_size)].tolist()
    meta = build_prefill_metadata([chunk], [ctx], [table], block_size, "cuda")
    q = torch.randn(chunk, heads, head_dim, device="cuda", generator=g).bfloat16()
    k = torch.randn(chunk, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    v = torch.randn(chunk, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = prefill_attention(q, k, v, k_cache, v_cache, meta)
    keys = k_cache[table].flatten(0, 1)[:ctx].double().repeat_interleave(4, 1).transpose(0, 1)[None]
    values = v_cache[table].flatten(0, 1)[:ctx].double().repeat_interleave(4, 1).transpose(0, 1)[None]
    ref = torch.nn.functional.scaled_dot_product_attention(q.double().transpose(0, 1)[None], keys, values,
                                                           attn_mask=causal_lower_right(chunk, ctx))
    assert rel_err(out, ref[0].transpose(0, 1)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype,heads,kv_heads", [(torch.float32, 8, 8), (torch.bfloat16, 32, 8),
                                                   (torch.bfloat16, 28, 4), (torch.float32, 8, 1)])
def test_paged_prefill_kernel_equals_the_reference_on_ragged_chunks(dtype, heads, kv_heads):
    """One launch for a ragged batch of chunks (fresh, after a 64k prefix, one token, short) over random
    block tables, GQA groups 1, 4, 7 and 8, against float64 SDPA on the gathered context."""
    from djinnd.engine.kernels import prefill_attention_kernel
    from djinnd.model.attention import build_prefill_metadata, prefill_attention, write_kv
    from torch.nn.attention.bias import causal_lower_right
    g = torch.Generator(device="cuda").manual_seed(heads)
    prefixes, chunks, block_size, head_dim = [0, 65536, 300, 17], [300, 700, 1, 64], 16, 128
    contexts = [p + c for p, c in zip(prefixes, chunks)]
    num_blocks = sum(-(-c // block_size) for c in contexts) + 4
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    order, tables = torch.randperm(num_blocks, device="cuda", generator=g).tolist(), []
    for c in contexts:
        tables.append(order[:-(-c // block_size)])
        order = order[len(tables[-1]):]
    meta = build_prefill_metadata(chunks, contexts, tables, block_size, "cuda")
    q = torch.randn(sum(chunks), heads, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(sum(chunks), kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(sum(chunks), kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = prefill_attention(q, k, v, k_cache, v_cache, meta, prefill_attention_kernel("cuda", head_dim, "auto"))
    assert meta.tiles is not None                    # the kernel ran, not the per-session path
    group, start = heads // kv_heads, 0
    for table, chunk, ctx in zip(tables, chunks, contexts):
        keys = k_cache[table].flatten(0, 1)[:ctx].double().repeat_interleave(group, 1).transpose(0, 1)[None]
        values = v_cache[table].flatten(0, 1)[:ctx].double().repeat_interleave(group, 1).transpose(0, 1)[None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[start:start + chunk].double().transpose(0, 1)[None], keys, values,
            attn_mask=causal_lower_right(chunk, ctx))
        assert rel_err(out[start:start + chunk], ref[0].transpose(0, 1)) < TOL[dtype], (chunk, ctx)
        start += chunk


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_kernel_equals_f_linear_on_decode_shapes(dtype):
    """One row through the Triton GEMV against float64, within one rounding of the output, on
    Llama-3.1-8B's QKV (with a bias, as Qwen2's), O, gate/up and down shapes; F.linear as a yardstick."""
    from djinnd.model import triton_gemv
    g = torch.Generator(device="cuda").manual_seed(2)
    for out_f, in_f, with_bias in [(6144, 4096, True), (4096, 4096, False), (28672, 4096, False), (4096, 14336, False)]:
        x = torch.randn(1, in_f, device="cuda", generator=g).to(dtype)
        w = (torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02).to(dtype)
        bias = torch.randn(out_f, device="cuda", generator=g).to(dtype) if with_bias else None
        assert triton_gemv.fits(x, w)
        ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        mine, cublas = triton_gemv.linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
        assert rel_err(mine, ref) <= max(2 * rel_err(cublas, ref), 4e-3), (out_f, in_f)


def engine_tokens(overrides: dict, prompts, new_tokens: int):
    from djinnd.config import load_config
    from djinnd.daemon import build_engine
    from djinnd.engine.local import LocalClient
    engine = build_engine(load_config(None, {"model": "random:llama-3.2-1b", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 8192.0, "max_num_seqs": 4, **overrides}))
    engine.start()
    client = LocalClient(engine)
    pending = [client.submit(client.open(), p, new_tokens) for p in prompts]
    outs = [client.done(e)[0].tokens for e in pending]
    engine.stop()
    engine.join()
    return engine, outs


def test_decode_after_long_prompts_gives_the_torch_paths_tokens():
    """fp32, Llama-3.2-1B shapes (GQA group 4, window 131,072): prompts of 20k, 3k and 37 tokens
    decode the same tokens through graphs + split-K kernel as through the eager torch path."""
    from conftest import random_prompts
    prompts = random_prompts(128256, [20000, 3000, 37], seed=5)
    fast, out_fast = engine_tokens({}, prompts, 16)
    assert fast.runner.decoder.graphs, "no CUDA graphs were captured"
    _, out_eager = engine_tokens({"cuda_graphs": False, "attention": "torch"}, prompts, 16)
    assert out_fast == out_eager


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_rope_and_kv_write_kernel_equals_the_torch_path(cache_dtype):
    """bf16 q/k/v views of one projection: q and k rotated in place as apply_rope rotates them (fp32,
    within one bf16 rounding), and the cache holds exactly what write_kv stores of that k and v (an
    fp8 cache saturated to 448)."""
    from djinnd.model.attention import write_kv
    from djinnd.model.rope import apply_rope, rope_tables
    from djinnd.model.triton_fused import rope_write_kv
    g = torch.Generator(device="cuda").manual_seed(5)
    tokens, heads, kv_heads, dim = 37, 32, 8, 128
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", generator=g) * 100).bfloat16()
    slots = torch.randperm(64 * 16, device="cuda", generator=g)[:tokens]
    cos, sin = rope_tables(4096, dim, 500000.0, {}, torch.bfloat16, "cuda")
    positions = torch.randint(0, 4096, (tokens,), device="cuda", generator=g)
    cos, sin = cos[positions][:, None], sin[positions][:, None]
    sizes = [heads * dim, kv_heads * dim, kv_heads * dim]
    split = lambda x: (t.view(tokens, -1, dim) for t in x.split(sizes, -1))  # noqa: E731
    caches = [torch.zeros(64, 16, kv_heads, dim, device="cuda").to(cache_dtype) for _ in range(4)]
    x = qkv.clone()
    q, k, v = split(x)
    rope_write_kv(q, k, v, cos, sin, caches[0], caches[1], slots)
    q0, k0, _ = split(qkv)
    for mine, ref in ((q, apply_rope(q0.float(), cos.float(), sin.float())),
                      (k, apply_rope(k0.float(), cos.float(), sin.float()))):
        torch.testing.assert_close(mine.float(), ref, rtol=2 ** -7, atol=1e-3)
    write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].float(), caches[2].float()) and torch.equal(caches[1].float(), caches[3].float())
    if cache_dtype != torch.bfloat16:
        assert caches[0].float().abs().max() == 448.0         # values past e4m3's range saturate


def test_split_kernel_reads_an_fp8_cache():
    """bf16 queries over an fp8_e4m3 cache: the kernel equals the torch path on the same cache, and
    the bf16 cache's output within fp8 precision."""
    q, k_cache, v_cache, tables, ctx, width = ragged_case([1, 700, 9000], 8, 4, torch.bfloat16)
    k8, v8 = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    same_cache = decode_attention_torch(q.double(), k8, v8, tables, ctx, width)
    full = decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), tables, ctx, width)
    for block_n in (64, tile_for(1, 3)):           # the bf16 tile, and the one the engine uses on fp8
        splits = num_splits_for(3, 8, 16384, NUM_SMS, block_n)
        out = paged_decode_attention(q, k8, v8, tables, ctx, splits, block_n)
        assert rel_err(out, same_cache) < TOL[torch.bfloat16] and rel_err(out, full) < 0.05


def test_an_fp8_kv_engine_decodes_and_its_first_tokens_equal_the_full_precision_pools():
    """kv_cache_dtype fp8_e4m3 on CUDA: graphs and the split-K kernel read the fp8 pool; each prompt
    fits one chunk, so its first token (from its own K/V) equals the fp32 pool's."""
    from conftest import random_prompts
    prompts = random_prompts(128256, [1500, 300, 37], seed=6)
    fp8, out_fp8 = engine_tokens({"kv_cache_dtype": "fp8_e4m3"}, prompts, 16)
    _, out_full = engine_tokens({}, prompts, 16)
    assert fp8.pool.k.dtype == torch.float8_e4m3fn and all(len(t) == 16 for t in out_fp8)
    assert [t[0] for t in out_fp8] == [t[0] for t in out_full]
