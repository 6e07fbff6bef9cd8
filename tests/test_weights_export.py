"""Shared resident weights on CPU, through a real djinnd and real agent processes: attached tensors
are the daemon's shared memory (mapped read-only, no copy), hf_model() and GhostModel give the
daemon's own logits and tokens, a killed attached process leaves nothing behind, and a daemon
without an export says why."""
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import libdjinn
from conftest import ROOT, random_prompts, start_daemon, stop_daemon
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine import commands as cmd
from djinnd.engine.local import LocalClient
from djinnd.model.flat_weights import ALIGN, FlatWeights, pack_weights
from djinnd.model.llama import LlamaForCausalLM, hf_state_dict
from djinnd.model.loader import load_model
from djinnd.model.presets import PRESETS
from libdjinn.protocol import ErrorCode

AGENT = os.path.join(ROOT, "tests", "weights_agent.py")


@pytest.fixture(scope="module")
def reference():
    """The daemon's weights, rebuilt here from the same seed (not packed, not shared)."""
    return hf_state_dict(load_model("random:tiny", 0, torch.float32, "cpu").model)


def maps_of(pid: int, segment: str) -> list[list[str]]:
    with open(f"/proc/{pid}/maps") as fh:
        return [line.split() for line in fh if segment in line]


def holds_fd(pid: int, segment: str) -> bool:
    """Whether process pid has a descriptor of the memfd `segment` open."""
    links = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except OSError:
            pass
    return any(link.split(" ")[0] == f"/{segment}" for link in links)


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def attachment_pids(djinn) -> list[int]:
    return [a["pid"] for a in djinn.status()["weights_export"]["attachments"]]


def test_attached_agent_maps_the_daemons_segment_and_a_killed_one_leaves_nothing(tiny_daemon):
    agent = subprocess.Popen([sys.executable, AGENT, tiny_daemon.socket, "hold"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        report = json.loads(agent.stdout.readline())
        daemon_maps = maps_of(tiny_daemon.proc.pid, report["segment"])
        # one file, two processes: the same inode, shared; the agent's view is read-only
        assert daemon_maps and report["maps"]
        assert {m[4] for m in report["maps"]} == {m[4] for m in daemon_maps}
        assert all(m[1] == "r--s" for m in report["maps"]) and all(m[1] == "rw-s" for m in daemon_maps)
        lo, hi = (int(x, 16) for x in report["maps"][0][0].split("-"))
        for name, (ptr, nbytes) in report["tensors"].items():
            assert lo <= ptr and ptr + nbytes <= hi, name
        with libdjinn.connect(tiny_daemon.socket) as djinn:
            rows = djinn.status()["weights_export"]["attachments"]
            assert [(r["pid"], r["bytes_mapped"]) for r in rows] == [(agent.pid, report["nbytes"])]
            ctl = subprocess.run([sys.executable, "-m", "libdjinn.ctl", "--socket", tiny_daemon.socket, "status"],
                                 capture_output=True, text=True, timeout=60).stdout
            assert "weights export: shm" in ctl and f"{agent.pid:>7}" in ctl
            agent.kill()
            agent.wait(10)
            wait_for(lambda: attachment_pids(djinn) == [])
            assert not holds_fd(tiny_daemon.proc.pid, report["logits_segment"])   # its ghost logits went too
            assert djinn.session().generate(prompt_ids=[1, 2, 3], max_new_tokens=2).tokens
        assert tiny_daemon.alive() and maps_of(tiny_daemon.proc.pid, report["segment"])
    finally:
        agent.kill()


def test_attached_tensors_hold_the_daemons_weights_without_a_copy(tiny_daemon, reference):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        w = djinn.attach_weights()
        assert set(w) == set(reference)
        for name, t in w.items():
            assert torch.equal(t, reference[name]), name
        [mine] = {m[0] for m in maps_of(os.getpid(), w.segment)} or [None]
        lo, hi = (int(x, 16) for x in mine.split("-"))
        assert all(lo <= t.data_ptr() < hi for t in w.values())
        q, k = w["model.layers.0.self_attn.q_proj.weight"], w["model.layers.0.self_attn.k_proj.weight"]
        assert k.data_ptr() == q.data_ptr() + q.nbytes      # row slices of the fused qkv weight
        w.detach()
        assert os.getpid() not in attachment_pids(djinn)


def test_writing_attached_weights_kills_only_the_writer(tiny_daemon, reference):
    """The read-only contract is the OS's: a write faults in the agent; the daemon's weights are intact."""
    out = subprocess.run([sys.executable, AGENT, tiny_daemon.socket, "write"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == -signal.SIGSEGV and "wrote" not in out.stdout
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        assert torch.equal(djinn.attach_weights()["model.norm.weight"], reference["model.norm.weight"])
        with pytest.raises(ValueError, match="read-only"):
            djinn.attach_weights(writable=True)
        with pytest.raises(libdjinn.BadRequest, match="read-only"):
            djinn.request("attach_weights", writable=True)


def test_hf_model_logits_equal_the_daemons_forward(tiny_daemon):
    ids = torch.tensor(random_prompts(512, [13, 13], seed=31))
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        hf = djinn.hf_model()
        ghost = libdjinn.GhostModel(djinn)
        with torch.no_grad():
            mine = hf(ids).logits
        theirs = ghost(ids).logits
    assert type(hf).__name__ == "LlamaForCausalLM" and not any(p.requires_grad for p in hf.parameters())
    assert theirs.shape == (2, 13, 512)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_ghost_generate_equals_session_generate_and_hf_generate(tiny_daemon):
    prompts = random_prompts(512, [9, 9], seed=32)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        ghost = libdjinn.GhostModel(djinn)
        greedy = ghost.generate(torch.tensor(prompts), max_new_tokens=10, min_new_tokens=10)
        for row, prompt in zip(greedy.tolist(), prompts):
            plain = djinn.session().generate(prompt_ids=prompt, max_new_tokens=10, ignore_eos=True).tokens
            assert row == prompt + plain
        with torch.no_grad():
            hf = djinn.hf_model().generate(torch.tensor(prompts), max_new_tokens=10, min_new_tokens=10,
                                           do_sample=False, attention_mask=torch.ones(2, 9, dtype=torch.long))
    assert torch.equal(greedy, hf)
    assert ghost.config.vocab_size == 512 and ghost.config.num_hidden_layers == 4


def test_bad_forward_requests_get_clear_errors(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        with pytest.raises(libdjinn.BadRequest, match="one length"):
            djinn.request("forward", input_ids=[[1, 2], [3]])
        with pytest.raises(libdjinn.BadRequest, match="vocabulary"):
            djinn.request("forward", input_ids=[[1, 99999]])
        with pytest.raises(ValueError, match="padded"):
            libdjinn.GhostModel(djinn)(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 1]]))
        assert djinn.request("forward", input_ids=[[1, 2]])["logits"]["shape"] == [1, 2, 512]


def test_a_daemon_without_an_export_refuses_attach_and_says_why(tmp_path):
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "4", "--export-weights", "false")
    try:
        with libdjinn.connect(daemon.socket) as djinn:
            with pytest.raises(libdjinn.NotExported, match="export_weights: false"):
                djinn.attach_weights()
            export = djinn.status()["weights_export"]
            assert not export["exported"] and "export_weights" in export["reason"]
            assert libdjinn.GhostModel(djinn)(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)
    finally:
        stop_daemon(daemon)


def test_a_streamed_model_refuses_attach():
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "kv_cache_mb": 4.0}))
    engine.loaded.model.streamer = object()       # what weight streaming sets
    engine.start()
    try:
        reply = LocalClient(engine).call(lambda r: cmd.AttachWeights(0, 0, False, r)).get(timeout=60)[1]
    finally:
        engine.stop()
        engine.close_weights()
    assert isinstance(reply, cmd.Failed) and reply.code == ErrorCode.NOT_EXPORTED and "streamed" in reply.message


def test_packing_makes_every_parameter_a_view_of_one_private_segment():
    torch.manual_seed(0)
    model = LlamaForCausalLM(dataclasses.replace(PRESETS["tiny"], tie_word_embeddings=True))
    model.tie_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = pack_weights(model)
    assert isinstance(flat, FlatWeights)
    try:
        base = flat.buffer.data_ptr()
        for p in model.parameters():
            assert base <= p.data_ptr() < base + flat.nbytes and (p.data_ptr() - base) % ALIGN == 0
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        seals = fcntl.fcntl(flat.shm.fd, fcntl.F_GET_SEALS)      # a memfd nobody can resize or write
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"djinn-{os.getpid()}-weights")]
        offsets = {name: offset for name, offset, _, _ in flat.layout}
        assert offsets["lm_head.weight"] == offsets["model.embed_tokens.weight"]
    finally:
        flat.close()
