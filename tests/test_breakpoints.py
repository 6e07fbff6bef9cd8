"""White-box breakpoints through a real daemon: pause after a layer, read or steer the hidden
states in shared memory, resume; tokens match an unpaused run, steering matches an HF hook."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import libdjinn
from conftest import hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd.model.loader import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("bp"), "--kv-cache-mb", "32")
    loaded = load_model("smollm2-135m", 0, torch.float32, "cpu")
    yield d, hf_reference(loaded.model)
    stop_daemon(d)


def steer_hook(layer_module, scale):
    def hook(module, args, out):
        return (out[0] * scale, *out[1:]) if isinstance(out, tuple) else out * scale
    return layer_module.register_forward_hook(hook)


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_unmodified_pauses_give_the_tokens_of_an_unpaused_run(which, tiny_daemon, smol):
    daemon = tiny_daemon if which == "tiny" else smol[0]
    layers = [0, 2, 3] if which == "tiny" else [0, 14, 29]
    [prompt] = random_prompts(512, [13], seed=21)
    with libdjinn.connect(daemon.socket) as djinn, libdjinn.connect(daemon.socket) as other:
        plain = djinn.session().generate(prompt_ids=prompt, max_new_tokens=8, ignore_eos=True).tokens
        trace = djinn.session().trace(prompt_ids=prompt, max_new_tokens=8, ignore_eos=True, breakpoints=layers,
                                      steps="all")
        seen = []
        for bp in trace:
            seen.append((bp.step, bp.layer, bp.shape[0]))
            if len(seen) == 2:    # while paused, another client's session runs to the end
                assert other.session().generate(prompt_ids=prompt, max_new_tokens=8, ignore_eos=True).tokens == plain
    assert trace.result.tokens == plain
    assert seen == [(step, layer, 13 if step == 0 else 1) for step in range(8) for layer in layers]


def test_steering_matches_an_hf_forward_hook(smol):
    daemon, hf = smol
    [prompt] = random_prompts(49152, [20], seed=22)
    with libdjinn.connect(daemon.socket) as djinn:
        final_hidden = {}

        def scale(bp):
            bp.hidden.mul_(0.9)

        steered = djinn.session().generate(prompt_ids=prompt, max_new_tokens=12, ignore_eos=True,
                                           hooks={15: scale}, hook_steps="all").tokens
        for key, layers in (("plain", [29]), ("steered", [15, 29])):
            for bp in djinn.session().trace(prompt_ids=prompt, max_new_tokens=1, breakpoints=layers):
                if bp.layer == 15:
                    bp.hidden.mul_(0.9)
                else:
                    final_hidden[key] = bp.hidden.clone()
    captured = {}

    def capture(module, args, out):      # the prompt's forward: the first call
        captured.setdefault("hf", (out[0] if isinstance(out, tuple) else out)[0].clone())

    handles = [steer_hook(hf.model.layers[15], 0.9), hf.model.layers[29].register_forward_hook(capture)]
    try:
        expected = hf_greedy(hf, prompt, 12)
    finally:
        for h in handles:
            h.remove()
    assert steered == expected
    # the edit changes what the last layer outputs (so the logits), exactly as the HF hook does
    assert (final_hidden["steered"] - final_hidden["plain"]).abs().max() > 1e-2
    torch.testing.assert_close(final_hidden["steered"], captured["hf"], rtol=1e-4, atol=1e-4)


def test_resume_with_the_wrong_shape_is_refused_and_stays_paused(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        trace = s.trace(prompt_ids=[4, 5, 6], max_new_tokens=3, ignore_eos=True, breakpoints=[1])
        for bp in trace:
            with pytest.raises(libdjinn.BadRequest, match=r"shape \[2, 64\].*\[3, 64\]"):
                bp.resume(torch.zeros(2, 64))
            with pytest.raises(libdjinn.BadRequest, match="dtype float16"):
                djinn.request("resume", session=s.id, shape=[3, 64], dtype="float16")
            state = next(r["state"] for r in djinn.status()["sessions"] if r["id"] == s.id)
            assert state == "paused"
            bp.resume(bp.hidden.clone())
        plain = djinn.session().generate(prompt_ids=[4, 5, 6], max_new_tokens=3, ignore_eos=True).tokens
    assert trace.result.tokens == plain


def test_paused_session_can_be_paged_and_still_resumes_exactly(tmp_path):
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.125")    # 8 blocks
    try:
        with libdjinn.connect(daemon.socket) as djinn:
            s = djinn.session()
            plain = djinn.session().generate(prompt_ids=list(range(3, 40)), max_new_tokens=5, ignore_eos=True).tokens
            trace = s.trace(prompt_ids=list(range(3, 40)), max_new_tokens=5, ignore_eos=True, breakpoints=[2])
            for bp in trace:
                s.signal_phase("IO_WAIT")
                djinn.session().generate(prompt_ids=list(range(3, 83)), max_new_tokens=10)   # wants its room
                row = next(r for r in djinn.status()["sessions"] if r["id"] == s.id)
                assert (row["state"], row["kv_where"]) == ("paused", "host")
        assert trace.result.tokens == plain
    finally:
        stop_daemon(daemon)


AGENT = """
import sys, time, libdjinn
djinn = libdjinn.connect(sys.argv[1])
for bp in djinn.session().trace(prompt_ids=[4, 5, 6], max_new_tokens=3, breakpoints=[1]):
    print(bp._mapped.desc["segment"], flush=True)
    time.sleep(60)
"""


def holds(daemon, segment: str) -> bool:
    """Whether the daemon still holds the pause's segment (a memfd: no /dev/shm name, an open descriptor)."""
    links = []
    for n in os.listdir(f"/proc/{daemon.proc.pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{daemon.proc.pid}/fd/{n}"))
        except OSError:
            pass                                      # closed while we looked
    return any(link.startswith(f"/{segment} ") or link == f"/{segment}" for link in links)


def test_client_killed_while_paused_is_cleaned_up(tiny_daemon):
    agent = subprocess.Popen([sys.executable, "-c", AGENT, tiny_daemon.socket], stdout=subprocess.PIPE, text=True)
    segment = agent.stdout.readline().strip()
    assert holds(tiny_daemon, segment)
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        deadline = time.time() + 30
        while any(r["owner_pid"] == agent.pid for r in djinn.status()["sessions"]):
            assert time.time() < deadline
            time.sleep(0.05)
    assert not holds(tiny_daemon, segment)


def test_breakpoint_layer_out_of_range_names_the_range(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        with pytest.raises(libdjinn.BadRequest, match=r"layers 0\.\.3"):
            list(djinn.session().trace(prompt_ids=[4], max_new_tokens=1, breakpoints=[9]))


def test_example_steering_agent_changes_the_answer(smol):
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "agents", "steering.py"),
                          "--socket", smol[0].socket, "--max-new-tokens", "12", "--strength", "8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [line.strip() for line in out.stdout.splitlines() if line.startswith("  ")]
    assert len(answers) == 3 and answers[0] != answers[2] and answers[1] != answers[2]
