"""Weight streaming on CPU: a weight budget smaller than the model streams its layers through the
ring (plain copies), and every forward gives exactly what a resident model gives: alone, batched,
paged and paused at breakpoints."""
import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch

import libdjinn
from conftest import ROOT, hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd import daemon
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.engine.streamer import STREAMED
from djinnd.model.presets import build_random
from test_daemon import TINY_VOCAB, spawn_agent
from test_paging import agent_jobs

# random:tiny: 0.93 MiB of weights; a layer's matrices are 168 KiB, embeddings + lm_head + norms 258 KiB.
# 0.8 MiB holds those, a ring of 2 slots and 1 resident layer: 3 of 4 layers stream.
BUDGET_MB = "0.8"


@pytest.fixture(scope="module")
def hf_tiny():
    return hf_reference(build_random("tiny", 0, torch.float32, "cpu"))


def in_process(**overrides):
    config = load_config(None, {"model": "random:tiny", "device": "cpu", "kv_cache_mb": 1.0, **overrides})
    engine = build_engine(config)
    engine.start()
    return engine, LocalClient(engine)


def generate_all(client, prompts, new_tokens=16) -> list[list[int]]:
    sessions = [client.open() for _ in prompts]
    pending = [client.submit(s, p, new_tokens) for s, p in zip(sessions, prompts)]   # batched together
    return [client.done(e)[0].tokens for e in pending]


PROMPTS = random_prompts(TINY_VOCAB, [9, 40, 23], seed=31)


@pytest.fixture(scope="module")
def resident_tokens():
    engine, client = in_process()
    try:
        return generate_all(client, PROMPTS)
    finally:
        engine.stop()


@pytest.mark.parametrize("depth,chunk_mb", [(0, 0.0), (1, 0.01), (2, 0.0)])
def test_streamed_engine_gives_the_resident_tokens_at_any_depth_and_chunk(depth, chunk_mb, resident_tokens):
    engine, client = in_process(weights_budget_mb=float(BUDGET_MB), prefetch_depth=depth, stream_chunk_mb=chunk_mb)
    try:
        got = generate_all(client, PROMPTS)
        status = engine.loaded.model.streamer.status()
    finally:
        engine.stop()
    assert got == resident_tokens
    layer = status["layer_bytes"]
    assert status["ring_slots"] == depth + 1 and status["ring_bytes"] == (depth + 1) * layer
    assert status["streamed_bytes"] > status["ring_bytes"]            # the ring is smaller than what streams
    # every forward copies each streamed layer once; the last one also prefetched the next's first `depth`
    counters = engine.metrics.snapshot()
    assert status["loads"] == (counters["prefill_steps"] + counters["decode_steps"]) * status["streamed_layers"] + depth


def test_a_budget_that_cannot_hold_the_ring_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"weights_budget_mb.*a ring of 3 layers.*give at least"):
        in_process(weights_budget_mb=0.5, prefetch_depth=2)
    engine, _ = in_process(weights_budget_mb=64.0)           # the whole model fits: nothing streams
    engine.stop()
    assert engine.loaded.model.streamer is None


def test_streamed_layers_original_weights_are_freed_after_setup(monkeypatch):
    """The loaded tensors of streamed layers are freed once copied to host memory, not kept alive twice."""
    load_model, originals = daemon.load_model, {}

    def load_and_watch(*args):
        loaded = load_model(*args)
        originals.update((name, weakref.ref(p)) for name, p in loaded.model.named_parameters())
        return loaded
    monkeypatch.setattr(daemon, "load_model", load_and_watch)
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "kv_cache_mb": 1.0,
                                             "weights_budget_mb": float(BUDGET_MB), "prefetch_depth": 1}))
    streamer = engine.loaded.model.streamer
    gc.collect()
    streamed = [f"model.layers.{i}.{m}.weight" for i in range(streamer.first, 4) for m in STREAMED]
    assert len(streamed) == 12 and set(streamed) <= set(originals)      # layers 1-3 stream
    assert [name for name in streamed if originals[name]() is not None] == []


def streamed(tmp_path, policy: str):
    return start_daemon(tmp_path, "--model", "random:tiny", "--weights-budget-mb", BUDGET_MB,
                        "--prefetch-depth", "1", "--kv-cache-mb", "0.25", "--policy", policy)


@pytest.fixture(scope="module")
def streamed_daemon(tmp_path_factory):
    d = streamed(tmp_path_factory.mktemp("stream"), "semantic")
    yield d
    stop_daemon(d)


@pytest.mark.parametrize("policy", ["semantic", "lru"])
def test_agents_batched_and_paged_get_the_resident_tokens(policy, streamed_daemon, tmp_path, hf_tiny):
    daemon = streamed_daemon if policy == "semantic" else streamed(tmp_path, policy)
    prompts = random_prompts(TINY_VOCAB, [30 + i % 7 for i in range(12)], seed=11)   # as test_paging: no near-ties
    pairs = list(zip(prompts[::2], prompts[1::2]))[:6 if policy == "semantic" else 4]   # 16 KV blocks: ~3 agents
    try:
        jobs = [agent_jobs(a, b, new_tokens=12) for a, b in pairs]
        for j in jobs:      # tool calls long enough that the agents' KV is held at once, however slow they start
            j[1] = {"tool_s": 2.0, "expected_s": 2.0}
        agents = [spawn_agent(daemon.socket, j) for j in jobs]
        outs = [agent.communicate(timeout=300) for agent in agents]
        with libdjinn.connect(daemon.socket) as djinn:
            status = djinn.status()
    finally:
        if daemon is not streamed_daemon:
            stop_daemon(daemon)
    for (first, second), agent, (out, err) in zip(pairs, agents, outs):
        assert agent.returncode == 0, err
        turn1, turn2 = json.loads(out)
        assert turn1["tokens"] == hf_greedy(hf_tiny, first, 12)
        assert turn2["tokens"] == hf_greedy(hf_tiny, first + turn1["tokens"] + second, 12)
    w = status["weight_streaming"]
    assert status["counters"]["swaps_out"] > 0                      # really paged
    assert status["counters"]["decode_steps"] < status["counters"]["decode_tokens"]   # really batched
    assert (w["resident_layers"], w["streamed_layers"], w["ring_slots"]) == (1, 3, 2)
    assert w["resident_bytes"] + w["streamed_bytes"] == status["memory"]["weights_bytes"]
    assert w["bytes_streamed"] >= w["loads"] * w["layer_bytes"] > 0


def test_breakpoints_inside_streamed_layers_pause_and_resume_exactly(streamed_daemon, hf_tiny):
    [prompt] = random_prompts(TINY_VOCAB, [13], seed=33)
    expected = hf_greedy(hf_tiny, prompt, 6)
    with libdjinn.connect(streamed_daemon.socket) as djinn, libdjinn.connect(streamed_daemon.socket) as other:
        trace = djinn.session().trace(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True, breakpoints=[0, 2],
                                      steps="all")
        for n, bp in enumerate(trace):
            if n == 1:    # paused after streamed layer 2: another session's forwards reuse the ring
                assert other.session().generate(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True).tokens \
                    == expected
    assert trace.result.tokens == expected


def test_djinnctl_shows_resident_and_streamed_weights(streamed_daemon):
    out = subprocess.run([sys.executable, "-m", "libdjinn.ctl", "--socket", streamed_daemon.socket, "status"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("stream"))
    assert "(1 layers)" in line and "(3 layers)" in line and "ring 2 slots" in line and "GB/s" in line
