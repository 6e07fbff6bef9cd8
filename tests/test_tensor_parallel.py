"""Tensor parallelism on CPU (gloo, fp32, random:tiny split over 2 ranks): a real daemon with a worker
process gives the tokens of the whole model for concurrent sessions whose KV is paged, with an
edited hidden state at a breakpoint; start-up refuses a world that does not divide the KV heads;
a rank that dies takes the daemon down cleanly. A sharded HF folder loads exactly the full
model's slices."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import libdjinn
from conftest import ROOT, random_prompts, start_daemon, stop_daemon
from djinnd.memory.block_pool import KVBlockPool
from djinnd.model.attention import ForwardContext, build_prefill_metadata, prefill_attention
from djinnd.model.llama import hf_state_dict
from djinnd.model.loader import load_hf_dir
from djinnd.model.presets import build_random
from djinnd.model.tp import TP, shard_tensor
from libdjinn.ctl import format_status

POOL_MB = "0.265625"     # random:tiny: 16 blocks of 16 tokens over both ranks, so the agents below page
SCALE_LAYER = 1
NEW = 12                 # tokens per turn: 4 agents x 2 turns hold ~24 blocks of KV, more than the pool


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", 0, torch.float32, "cpu")


@pytest.fixture(scope="module")
def tp_daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("tp"), "--model", "random:tiny", "--tensor-parallel", "2",
                     "--kv-cache-mb", POOL_MB, "--host-arena-mb", "4")
    yield d
    stop_daemon(d)


@torch.inference_mode()
def plain_greedy(model, prompt: list[int], n: int, after=None) -> list[int]:
    """The whole model, one process, every step a fresh forward over the whole sequence."""
    a, tokens = model.args, list(prompt)
    for _ in range(n):
        blocks = list(range(-(-len(tokens) // 16)))
        pool = KVBlockPool(a.num_layers, a.num_kv_heads, a.head_dim, 16, 2**22, torch.float32, "cpu")
        meta = build_prefill_metadata([len(tokens)], [len(tokens)], [blocks], 16, "cpu")
        h = model.embed(torch.tensor(tokens))
        cos, sin = model.rope(meta.positions, h.dtype)
        ctx = ForwardContext(cos, sin, meta.slot_mapping,
                             lambda q, k, v, kc, vc: prefill_attention(q, k, v, kc, vc, meta))
        h = model.run_layers(h, ctx, pool.k, pool.v, after=after)
        tokens.append(int(model.logits(h[-1:]).argmax()))
    return tokens[len(prompt):]


def scaled(i, h):
    return h * 0.9 if i == SCALE_LAYER else h


def test_tp2_gives_the_whole_models_tokens_for_paged_concurrent_sessions_and_an_edited_breakpoint(tp_daemon, tiny):
    prompts = random_prompts(512, [28 + i % 9 for i in range(8)], seed=31)
    firsts, seconds, results, errors = prompts[:4], prompts[4:], {}, []

    def agent(i):
        try:
            with libdjinn.connect(tp_daemon.socket) as djinn:
                s = djinn.session()
                one = s.generate(prompt_ids=firsts[i], max_new_tokens=NEW, ignore_eos=True).tokens
                s.signal_phase("IO_WAIT", expected_s=0.4)
                time.sleep(0.4)
                two = s.generate(prompt_ids=seconds[i], max_new_tokens=NEW, ignore_eos=True).tokens
                results[i] = (one, two)
        except Exception as e:          # reported below, with the others' results
            errors.append(f"agent {i}: {type(e).__name__}: {e}")

    def edited(bp):          # a client's edit of the full hidden state must reach every rank
        bp.hidden.mul_(0.9)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(firsts))]
    for t in threads:
        t.start()
    with libdjinn.connect(tp_daemon.socket) as djinn:
        steered = djinn.session().generate(prompt_ids=firsts[0], max_new_tokens=8, ignore_eos=True,
                                           hooks={SCALE_LAYER: edited}, hook_steps="all").tokens
        for t in threads:
            t.join(240)
        status = djinn.status()
    assert not errors, errors
    for i, (one, two) in sorted(results.items()):
        assert one == plain_greedy(tiny, firsts[i], NEW), f"agent {i}, turn 1"
        assert two == plain_greedy(tiny, firsts[i] + one + seconds[i], NEW), f"agent {i}, turn 2"
    assert len(results) == len(firsts)
    assert steered == plain_greedy(tiny, firsts[0], 8, after=scaled)
    assert steered != plain_greedy(tiny, firsts[0], 8)       # the edit mattered
    assert status["counters"].get("swaps_out", 0) > 0 and status["counters"].get("swaps_in", 0) > 0
    ranks = status["tensor_parallel"]["ranks"]
    assert [(r["rank"], r["alive"]) for r in ranks] == [(0, True), (1, True)]
    assert ranks[0]["kv_pool_bytes"] == ranks[1]["kv_pool_bytes"] == status["memory"]["kv_pool_bytes"]
    assert "rank 1  pid" in format_status(status)            # djinnctl status lists the ranks


def test_a_world_that_does_not_divide_the_kv_heads_is_refused_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "djinnd", "--socket", str(tmp_path / "d.sock"), "--device", "cpu",
                          "--model", "random:tiny", "--tensor-parallel", "3"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--tensor-parallel 3" in lines[0] and "num_key_value_heads (2)" in lines[0], out.stderr


def test_sharded_hf_folder_loads_each_ranks_slices_of_the_full_weights(tmp_path, tiny):
    a = tiny.args
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in hf_state_dict(tiny).items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**a.to_hf(), "architectures": ["LlamaForCausalLM"]}))
    full = dict(tiny.named_parameters())
    for rank in range(2):
        tp = TP(rank, 2)
        shard = load_hf_dir(str(folder), torch.float32, "cpu", tp)
        for name, p in shard.named_parameters():
            assert torch.equal(p, shard_tensor(name, full[name], a, tp)), (rank, name)
        assert shard.model.layers[0].self_attn.num_kv_heads == a.num_kv_heads // 2


def test_a_rank_that_dies_takes_the_daemon_down_cleanly(tp_daemon):
    """Last: it stops the module's daemon."""
    pid = tp_daemon.proc.pid
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    worker = next(w for w in workers if "spawn_main" in open(f"/proc/{w}/cmdline").read())
    segments = lambda: [n for n in os.listdir("/dev/shm") if n.startswith((f"djinn-{pid}-", f"djinn-{worker}-"))]
    with libdjinn.connect(tp_daemon.socket) as djinn, pytest.raises(libdjinn.DaemonUnavailable):
        for bp in djinn.session().trace(prompt_ids=[5, 6, 7], max_new_tokens=4, breakpoints=[1]):
            os.kill(worker, signal.SIGKILL)
            assert tp_daemon.proc.wait(60) == 70
            bp.resume(bp.hidden.clone())
    assert f"tensor-parallel rank 1 (pid {worker}) exited" in tp_daemon.log()
    assert not segments()          # named shared memory of either rank (host arenas and sealed segments are memfds)
