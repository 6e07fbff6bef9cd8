"""On CUDA: tensor parallelism over NCCL (two GPUs) gives the tokens of one GPU, with CUDA graphs,
concurrent sessions and an edited breakpoint; with fewer GPUs than ranks, start-up names the missing ones."""
import subprocess
import sys
import threading

import pytest
import torch

import libdjinn
from conftest import ROOT, random_prompts, start_daemon, stop_daemon

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
