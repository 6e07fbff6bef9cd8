"""On CUDA: the Triton decode kernel equals the torch reference; graph-replayed decode gives the
eager path's tokens; decode logits stay within fp16 tolerance of HF; sampling noise is the same
function on CPU and GPU."""
import pytest
import torch

from conftest import hf_reference, random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.engine.sampler import uniform_noise
from djinnd.model.attention import decode_attention_torch
from djinnd.session import SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [(8, 8, 128, torch.float32), (8, 2, 64, torch.float16),
                                                           (32, 32, 128, torch.float16)])
def test_kernel_equals_the_torch_reference_on_ragged_random_tables(heads, kv_heads, head_dim, dtype):
    from djinnd.model.triton_attention import paged_decode_attention
    g = torch.Generator(device="cuda").manual_seed(0)
    num_blocks, block_size, lens = 128, 16, [1, 15, 16, 17, 100, 255, 513]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    width = -(-max(lens) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, device="cuda", generator=g)[:width] for _ in lens]).int()
    ctx = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(len(lens), heads, head_dim, device="cuda", generator=g).to(dtype)
    out = paged_decode_attention(q, k_cache, v_cache, tables, ctx)
    ref = decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), tables, ctx, width)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def run_engine(overrides: dict, prompts, params: SamplingParams):
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 64.0, **overrides}))
    engine.start()
    client = LocalClient(engine)
    pending = [client.submit(client.open(), p, params=params) for p in prompts]
    outs = [client.done(e)[0].tokens for e in pending]
    engine.stop()
    engine.join()
    return engine, outs


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=24, ignore_eos=True),
                                    SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.8,
                                                   top_p=0.9, seed=11)])
def test_graph_replay_gives_the_eager_paths_tokens(params):
    prompts = random_prompts(512, [3, 17, 40, 9, 64, 5], seed=7)
    graphed, out_graph = run_engine({}, prompts, params)
    assert graphed.runner.decoder.graphs, "no CUDA graphs were captured"
    _, out_eager = run_engine({"cuda_graphs": False, "attention": "torch"}, prompts, params)
    assert out_graph == out_eager


def test_decode_logits_within_fp16_tolerance_of_hf():
    engine = build_engine(load_config(None, {"model": "random:llama-2-7b", "device": "cuda", "dtype": "float16",
                                             "kv_cache_mb": 1024.0}))
    engine.start()
    client = LocalClient(engine)
    prompt = random_prompts(32000, [200], seed=5)[0]
    done, _ = client.done(client.submit(client.open(), prompt, 16))
    # The last decode step's logits (batch of one). Decode is pipelined, so the last step launched is
    # the one past the request's end: it fed the final token, and its logits follow the whole sequence.
    ours = engine.runner.decoder.logits[0].clone()
    engine.stop()
    engine.join()
    from experiments.bench_decode import hf_model
    hf = hf_model(engine.loaded.model)
    with torch.no_grad():
        ids = torch.tensor([prompt + done.tokens], device="cuda")
        theirs = hf(ids).logits[0, -1].float()
    err = (ours - theirs).norm() / theirs.norm()
    assert err < 2e-2, err
    assert ours.argmax() == theirs.argmax() or (theirs.max() - theirs[ours.argmax()]) < 0.05 * theirs.std()


def test_sampling_noise_is_the_same_on_cpu_and_gpu():
    seeds, positions = torch.tensor([0, 7, 2**61]), torch.tensor([0, 100, 5])
    cpu = uniform_noise(seeds, positions, 1000)
    gpu = uniform_noise(seeds.cuda(), positions.cuda(), 1000).cpu()
    assert torch.equal(cpu, gpu) and 0 < cpu.min() and cpu.max() < 1


def test_hf_reference_tokens_with_graphs():
    """Graphs and the kernel in fp32 still give HF's greedy tokens."""
    from conftest import hf_greedy
    prompts = random_prompts(512, [5, 33, 70], seed=3)
    engine, outs = run_engine({}, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    hf = hf_reference(engine.loaded.model).cuda()
    assert outs == [hf_greedy(hf, p, 20) for p in prompts]
