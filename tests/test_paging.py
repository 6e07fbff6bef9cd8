"""Memory virtualization with real agent processes: more KV than the pool holds, every agent
finishes, and its tokens equal an unswapped run (HF transformers) whatever the policy."""
import json
import os

import pytest
import torch

import libdjinn
from conftest import hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd.model.presets import build_random
from test_daemon import TINY_VOCAB, spawn_agent

POOL_MB = "0.265625"  # random:tiny: 16 KiB per 16-token block: 16 blocks (about 3 agents' worth) + the scratch block
NUM_AGENTS = 22


@pytest.fixture(scope="module")
def hf_tiny():
    return hf_reference(build_random("tiny", 0, torch.float32, "cpu"))


def agent_jobs(first, second, new_tokens=20):
    gen = {"max_new_tokens": new_tokens, "ignore_eos": True}
    return [{"prompt_ids": first, **gen}, {"tool_s": 0.3, "expected_s": 0.3}, {"prompt_ids": second, **gen}]


@pytest.mark.parametrize("policy", ["semantic", "lru", "recompute"])
def test_oversubscribed_agents_all_finish_with_unswapped_tokens(tmp_path, hf_tiny, policy):
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", POOL_MB, "--policy", policy,
                          "--timeline-period-ms", "10")
    try:
        prompts = random_prompts(TINY_VOCAB, [30 + i % 7 for i in range(2 * NUM_AGENTS)], seed=11)
        pairs = list(zip(prompts[::2], prompts[1::2]))
        agents = [spawn_agent(daemon.socket, agent_jobs(a, b)) for a, b in pairs]
        outs = [agent.communicate(timeout=300) for agent in agents]
        with libdjinn.connect(daemon.socket) as djinn:
            status, timeline = djinn.status(), djinn.request("timeline")["timeline"]
    finally:
        stop_daemon(daemon)
    for (first, second), agent, (out, err) in zip(pairs, agents, outs):
        assert agent.returncode == 0, err
        turn1, turn2 = json.loads(out)
        assert turn1["tokens"] == hf_greedy(hf_tiny, first, 20), err
        assert turn2["tokens"] == hf_greedy(hf_tiny, first + turn1["tokens"] + second, 20), err
    pool = status["memory"]["kv_pool_bytes"]
    kv_needed = NUM_AGENTS * 80 * 1024               # ~80 tokens of 1 KiB each per agent
    assert kv_needed > 5 * pool                       # really oversubscribed
    used = [s["kv_pool_used_bytes"] for s in timeline]
    assert max(used) <= pool and used.count(pool) >= 3      # the plateau at the budget
    if policy == "recompute":
        assert status["counters"].get("swaps_out", 0) == 0
    else:
        assert status["counters"]["swaps_out"] > 0 and status["counters"]["swaps_in"] > 0
        assert max(s["host_arena_used_bytes"] for s in timeline) > 0


def fill_two_sessions(djinn, hf_tiny):
    sessions, prompts = [djinn.session(), djinn.session()], random_prompts(TINY_VOCAB, [30, 31], seed=12)
    outs = [s.generate(prompt_ids=p, max_new_tokens=10, ignore_eos=True).tokens for s, p in zip(sessions, prompts)]
    return sessions, prompts, outs


def test_policy_none_refuses_with_the_shortfall(tmp_path, hf_tiny):
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.140625", "--policy", "none")
    try:
        with libdjinn.connect(daemon.socket) as djinn:
            sessions, prompts, outs = fill_two_sessions(djinn, hf_tiny)      # 3 of 8 blocks each
            with pytest.raises(libdjinn.NoCapacity, match=r"needs 3 KV blocks, 2 free"):
                djinn.session().generate(prompt_ids=[7] * 30, max_new_tokens=10)
            more = sessions[0].generate(prompt_ids=[9], max_new_tokens=4, ignore_eos=True).tokens
        assert more == hf_greedy(hf_tiny, prompts[0] + outs[0] + [9], 4)
        assert daemon.alive()
    finally:
        stop_daemon(daemon)


def test_a_full_host_arena_drops_kv_and_the_next_turn_recomputes_it_with_the_same_tokens(tmp_path, hf_tiny):
    """Regression (H200 2026-12-01, 96 agents, 32 GB arena): 'NO_CAPACITY: needs 78 KV blocks, 13
    free and none can be freed' for requests that fit the pool; NO_CAPACITY is now only for a
    request that cannot fit even alone."""
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.140625",
                          "--host-arena-mb", "0.03",          # one host block: no session fits
                          "--prefix-sharing", "off")          # else a dropped history's full blocks stay cached
    try:
        with libdjinn.connect(daemon.socket) as djinn:
            sessions, prompts, outs = fill_two_sessions(djinn, hf_tiny)
            third = random_prompts(TINY_VOCAB, [30], seed=14)[0]
            assert djinn.session().generate(prompt_ids=third, max_new_tokens=10, ignore_eos=True).tokens == \
                hf_greedy(hf_tiny, third, 10)
            for s, p, o in zip(sessions, prompts, outs):
                assert s.generate(prompt_ids=[9], max_new_tokens=4, ignore_eos=True).tokens == \
                    hf_greedy(hf_tiny, p + o + [9], 4)
            with pytest.raises(libdjinn.NoCapacity, match="the pool has 8"):
                djinn.session().generate(prompt_ids=[7] * 130, max_new_tokens=10)
            counters = djinn.status()["counters"]
        assert counters["kv_drops_device"] >= 1 and counters["recomputed_tokens"] >= 40
        assert counters.get("requests_refused", 0) == 0
    finally:
        stop_daemon(daemon)


def test_agents_oversubscribing_pool_and_arena_all_finish_with_unswapped_tokens(tmp_path, hf_tiny):
    """Three tiers under real agents: the pool holds ~3 agents, the arena ~1; the rest is dropped
    and recomputed, and every token equals HF's."""
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", POOL_MB, "--host-arena-mb", "0.0625")
    try:
        prompts = random_prompts(TINY_VOCAB, [30 + i % 7 for i in range(16)], seed=15)
        pairs = list(zip(prompts[::2], prompts[1::2]))
        agents = [spawn_agent(daemon.socket, agent_jobs(a, b)) for a, b in pairs]
        outs = [agent.communicate(timeout=300) for agent in agents]
        with libdjinn.connect(daemon.socket) as djinn:
            counters = djinn.status()["counters"]
    finally:
        stop_daemon(daemon)
    for (first, second), agent, (out, err) in zip(pairs, agents, outs):
        assert agent.returncode == 0, err
        turn1, turn2 = json.loads(out)
        assert turn1["tokens"] == hf_greedy(hf_tiny, first, 20), err
        assert turn2["tokens"] == hf_greedy(hf_tiny, first + turn1["tokens"] + second, 20), err
    assert counters["swaps_out"] > 0 and counters["kv_drops_device"] + counters.get("kv_drops_host", 0) > 0


def test_io_wait_keeps_kv_until_its_room_is_wanted_and_active_brings_it_back(tmp_path, hf_tiny):
    """Semantic: a tool call alone moves nothing; another session's need evicts it; ACTIVE restores it."""
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.125")   # 8 blocks
    try:
        with libdjinn.connect(daemon.socket) as djinn:
            s, other = djinn.session(), djinn.session()
            mine = lambda: next(r for r in djinn.status()["sessions"] if r["id"] == s.id)  # noqa: E731
            prompt, big = random_prompts(TINY_VOCAB, [40, 80], seed=13)
            first = s.generate(prompt_ids=prompt, max_new_tokens=8, ignore_eos=True).tokens    # 3 blocks
            s.signal_phase("IO_WAIT", expected_s=60)
            assert mine()["kv_where"] == "device" and mine()["kv_blocks"] == 3
            other.generate(prompt_ids=big, max_new_tokens=10, ignore_eos=True)               # 6 blocks
            assert mine()["kv_where"] == "host" and mine()["host_blocks"] == 3
            s.signal_phase("ACTIVE")
            second = s.generate(prompt_ids=[5], max_new_tokens=6, ignore_eos=True)
            swaps = djinn.request("swaps")
        assert second.tokens == hf_greedy(hf_tiny, prompt + first + [5], 6)
        assert second.cached_tokens == len(prompt) + len(first) - 1
        causes = {(w["session"], w["direction"], w["cause"]) for w in swaps["recent"]}
        assert causes == {(s.id, "out", "pressure"), (other.id, "out", "prefetch_room"), (s.id, "in", "active")}
        assert swaps["latency_ms"]["ttft_prefetched"]["count"] == 1
    finally:
        stop_daemon(daemon)


def test_arena_segment_is_removed_on_exit_and_stale_ones_at_start(tmp_path):
    stale = "/dev/shm/djinn-999999999-kv0"            # no such pid: a crashed daemon's leftover
    open(stale, "wb").close()
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.5")
    with libdjinn.connect(daemon.socket) as djinn:
        segment = djinn.status()["memory"]["host_arena_segment"]
    named = [n for n in os.listdir("/dev/shm") if n.startswith(f"djinn-{daemon.proc.pid}-")]
    assert not os.path.exists(stale) and segment.startswith("memfd:") and named == []   # nothing to open
    stop_daemon(daemon)
