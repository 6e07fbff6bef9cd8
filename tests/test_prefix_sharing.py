"""Shared prefix KV through a real daemon: agent processes whose prompts share a prefix, more KV
than the pool holds, a traced session paused mid-forward meanwhile; every token equals an
unshared run (HF transformers, the reference an unshared daemon equals), whatever the policy."""
import json
import time

import pytest
import torch

import libdjinn
from conftest import hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd.model.presets import build_random
from libdjinn.ctl import format_status
from test_daemon import TINY_VOCAB, spawn_agent

POOL_MB = "0.265625"    # random:tiny: 16 blocks of 16 tokens
NUM_AGENTS = 8
NEW = 12


@pytest.fixture(scope="module")
def hf_tiny():
    return hf_reference(build_random("tiny", 0, torch.float32, "cpu"))


def jobs(first, second):
    gen = {"max_new_tokens": NEW, "ignore_eos": True}
    return [{"prompt_ids": first, **gen}, {"tool_s": 0.3, "expected_s": 0.3}, {"prompt_ids": second, **gen}]


@pytest.mark.parametrize("policy", ["semantic", "lru", "recompute"])
def test_agents_sharing_a_prefix_under_paging_and_breakpoints_get_unshared_tokens(tmp_path, hf_tiny, policy):
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", POOL_MB, "--policy", policy)
    [prefix] = random_prompts(TINY_VOCAB, [48], seed=31)                     # three full blocks
    ends = random_prompts(TINY_VOCAB, [4 + i % 5 for i in range(2 * NUM_AGENTS + 1)], seed=32)
    pairs = [(prefix + a, b) for a, b in zip(ends[:-1:2], ends[1::2])]
    try:
        with libdjinn.connect(daemon.socket) as djinn:
            warm = djinn.session().generate(prompt_ids=prefix + ends[-1], max_new_tokens=NEW, ignore_eos=True)
            traced = djinn.session()
            shared = traced.generate(prompt_ids=prefix + ends[-1], max_new_tokens=NEW, ignore_eos=True)
            agents = [spawn_agent(daemon.socket, jobs(a, b)) for a, b in pairs]
            trace = traced.trace(prompt_ids=[5, 6, 7], max_new_tokens=NEW, ignore_eos=True, breakpoints=[1],
                                 steps=[0, 4])       # paused on top of blocks the agents share
            for _ in trace:
                time.sleep(0.5)             # paused while the agents page the pool
            outs = [agent.communicate(timeout=600) for agent in agents]
            status = djinn.status()
    finally:
        stop_daemon(daemon)
    assert warm.tokens == shared.tokens == hf_greedy(hf_tiny, prefix + ends[-1], NEW)
    assert shared.cached_tokens == 48 and warm.cached_tokens == 0
    assert trace.result.tokens == hf_greedy(hf_tiny, prefix + ends[-1] + shared.tokens + [5, 6, 7], NEW)
    for (first, second), agent, (out, err) in zip(pairs, agents, outs):
        assert agent.returncode == 0, err
        turn1, turn2 = json.loads(out)
        assert turn1["tokens"] == hf_greedy(hf_tiny, first, NEW), err
        assert turn2["tokens"] == hf_greedy(hf_tiny, first + turn1["tokens"] + second, NEW), err
    assert sum(json.loads(out)[0]["cached_tokens"] > 0 for out, _ in outs) >= NUM_AGENTS // 2
    counters = status["counters"]
    assert counters.get("swaps_out", 0) + counters.get("kv_drops_device", 0) > 0      # it paged
    assert status["prefix_cache"]["hit_tokens"] >= 48 * (NUM_AGENTS // 2)
    assert "hit rate" in format_status(status)
