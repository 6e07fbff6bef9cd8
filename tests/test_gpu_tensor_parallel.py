"""On CUDA: tensor parallelism over NCCL (two GPUs) gives the tokens of one GPU, with CUDA graphs,
concurrent sessions and an edited breakpoint; with fewer GPUs than ranks, start-up names the missing ones."""
import subprocess
import sys
import threading

import pytest
import torch

import libdjinn
from conftest import ROOT, random_prompts, start_daemon, stop_daemon
from djinnd.engine.kernels import fused_kernels
from djinnd.memory.block_pool import KVBlockPool
from djinnd.model.attention import ForwardContext, build_prefill_metadata, prefill_attention
from djinnd.model.presets import build_random
from djinnd.model.tp import TP

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

FLAGS = ("--model", "random:tiny", "--device", "cuda", "--dtype", "float32", "--kv-cache-mb", "1")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with one GPU")
def test_more_ranks_than_gpus_is_refused_naming_the_missing_ones(tmp_path):
    out = subprocess.run([sys.executable, "-m", "djinnd", "--socket", str(tmp_path / "d.sock"),
                          "--model", "random:llama-3.1-8b", "--device", "cuda", "--tensor-parallel", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "cuda:1 not visible" in lines[0], out.stderr


@torch.inference_mode()
def prompt_logits(model, prompt: list[int], kv_heads: int) -> torch.Tensor:
    a = model.args
    pool = KVBlockPool(a.num_layers, kv_heads, a.head_dim, 16, 2**22, torch.float32, "cuda")
    meta = build_prefill_metadata([len(prompt)], [len(prompt)], [list(range(-(-len(prompt) // 16)))], 16, "cuda")
    h = model.embed(torch.tensor(prompt, device="cuda"))
    cos, sin = model.rope(meta.positions, h.dtype)
    attend = lambda q, k, v, kc, vc: prefill_attention(q, k, v, kc, vc, meta)  # noqa: E731
    ctx = ForwardContext(cos, sin, meta.slot_mapping, attend, fused_kernels("cuda", "auto"))
    return model.logits(model.run_layers(h, ctx, pool.k, pool.v))


def test_the_sharded_model_in_a_world_of_one_over_nccl_gives_the_plain_logits(tmp_path):
    """The tensor-parallel code path (a rank object, NCCL collectives, vocab-parallel embedding and
    lm_head) on one GPU; TP=1 itself runs the same classes without a rank object."""
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        [prompt] = random_prompts(512, [37], seed=43)
        plain = build_random("tiny", 0, torch.float32, "cuda")
        sharded = build_random("tiny", 0, torch.float32, "cuda", TP(0, 1))
        expected = prompt_logits(plain, prompt, plain.args.num_kv_heads)
        got = prompt_logits(sharded, prompt, plain.args.num_kv_heads)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def run_sessions(socket: str, prompts) -> tuple[list, list]:
    results = [None] * len(prompts)

    def one(i):
        with libdjinn.connect(socket) as djinn:
            results[i] = djinn.session().generate(prompt_ids=prompts[i], max_new_tokens=16, ignore_eos=True).tokens
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    with libdjinn.connect(socket) as djinn:
        edited = djinn.session().generate(prompt_ids=prompts[0], max_new_tokens=8, ignore_eos=True,
                                          hooks={1: lambda bp: bp.hidden.mul_(0.9)}).tokens
    return results, edited


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_over_nccl_gives_the_tokens_of_one_gpu(tmp_path):
    prompts = random_prompts(512, [20 + 3 * i for i in range(6)], seed=41)
    (tmp_path / "tp1").mkdir()
    (tmp_path / "tp2").mkdir()
    one = start_daemon(tmp_path / "tp1", *FLAGS)
    try:
        expected = run_sessions(one.socket, prompts)
    finally:
        stop_daemon(one)
    two = start_daemon(tmp_path / "tp2", *FLAGS, "--tensor-parallel", "2")
    try:
        got = run_sessions(two.socket, prompts)
        with libdjinn.connect(two.socket) as djinn:
            status = djinn.status()
    finally:
        stop_daemon(two)
    assert got == expected
    assert status["engine"]["cuda_graphs"] and len(status["tensor_parallel"]["ranks"]) == 2
