"""The semantic paging policy: who leaves the device first, learned tool durations, and real agent
processes under the Experiment 1 workload (tokens, reactive restores, prefetch by estimate, bursts)."""
import random
import time

import pytest
import torch

import libdjinn
from conftest import hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd.memory.policies import ToolDurations, eviction_order, prefetch_victims
from djinnd.model.presets import build_random
from djinnd.session import KVPlace, Phase, Session, SessionState
from experiments import exp1_agents
from test_daemon import TINY_VOCAB
from test_scheduler import pool_of, scheduler_of, waiting_session


def session(id, phase=Phase.ACTIVE, back=None, used=0.0, blocks=2, state=SessionState.IDLE):
    s = Session(id, owner=1, owner_pid=1, block_table=list(range(10 * id, 10 * id + blocks)), phase=phase,
                last_used=used, expected_back=back)
    s.state = state
    return s


def test_semantic_evicts_the_latest_return_first_then_idle_by_lru_and_queued_last():
    queued = session(1, state=SessionState.WAITING)
    soon, late, unknown = (session(i, Phase.IO_WAIT, back) for i, back in ((2, 5.0), (3, 50.0), (4, None)))
    old_idle, new_idle = session(5, used=1.0), session(6, used=9.0)
    running = session(7, state=SessionState.RUNNING)
    due = session(8, Phase.IO_WAIT, time.monotonic() + 0.01, used=0.5)
    due.prefetch_at = time.monotonic() - 0.01          # its prefetch time has come: back any moment
    everyone = [queued, soon, late, unknown, old_idle, new_idle, running, due]
    assert [s.id for s in eviction_order("semantic", everyone)] == [4, 3, 2, 5, 6, 8, 1]
    assert [s.id for s in eviction_order("lru", everyone)] == [2, 3, 4, 8, 5, 6, 1]


def test_a_prefetch_takes_room_only_from_sessions_due_back_later_or_idle():
    me = session(1, Phase.IO_WAIT, 10.0)
    earlier, later, idle = session(2, Phase.IO_WAIT, 5.0), session(3, Phase.IO_WAIT, 20.0), session(4, used=3.0)
    queued = session(5, state=SessionState.WAITING, blocks=8)
    everyone = [me, earlier, later, idle, queued]
    assert [s.id for s in prefetch_victims(everyone, me, 4, due=10.0)] == [3, 4]
    assert prefetch_victims(everyone, me, 5, due=10.0) == []      # not enough without queued work: take nothing


def test_tool_durations_need_two_calls_prefer_the_tool_and_stay_bounded():
    d = ToolDurations(quantile=0.2, max_keys=8)
    d.observe(1, None, 4.0)
    assert d.estimate(1, None) is None
    d.observe(1, None, 6.0)
    assert d.estimate(1, None) == 4.0 and d.estimate(2, None) is None
    for seconds in (10.0, 12.0, 11.0, 30.0, 13.0):
        d.observe(3, "search", seconds)
    assert d.estimate(1, "search") == 11.0     # that tool's history beats the session's own
    assert d.estimate(1, "unseen") == 4.0      # an unknown tool falls back to the session
    for i in range(20):
        d.observe(100 + i, f"tool{i}", 1.0)
    assert len(d.samples) <= 8


def full_pool_with_a_prefetch_due(hinted: bool):
    """A pool of 4 blocks held by `later` (in a tool call, due back in 100 s) and `idle`; `away`
    is on the host, its prefetch due now: by its own expected_s (hinted) or a learned duration."""
    pool = pool_of(4)
    pager = scheduler_of(pool, "semantic", host_blocks=8).pager
    away, later, idle = (session(i, blocks=0) for i in (1, 2, 3))
    for s in (away, later, idle):
        s.block_table, s.tokens, s.num_cached = pool.allocate(2) if s is not idle else [], list(range(8)), 8
        pager.sessions[s.id] = s
    pager.durations.observe(away.id, "search", 0.0)
    pager.durations.observe(away.id, "search", 0.0)        # learned: "search" returns at once
    pager.on_phase(away, Phase.IO_WAIT, 0.0 if hinted else None, "search")
    pager.on_phase(later, Phase.IO_WAIT, 100.0)
    assert pager.evict(away, "pressure")
    pager.poll()
    idle.block_table = pool.allocate(2)                    # someone else takes the room meanwhile
    assert pool.num_free == 0 and away.kv is KVPlace.HOST and away.prefetch_at <= time.monotonic()
    return pager, pool, away, later, idle


def test_a_full_pool_makes_room_for_a_prefetch_the_agent_announced():
    pager, pool, away, later, idle = full_pool_with_a_prefetch_due(hinted=True)
    pager.tick()
    pager.poll()
    assert away.kv is KVPlace.DEVICE and len(away.block_table) == 2 and later.kv is KVPlace.HOST


def test_a_prefetch_the_daemon_only_guessed_takes_free_room_only():
    """Evicting on a guess doubles the copies whenever the guess is early."""
    pager, pool, away, later, idle = full_pool_with_a_prefetch_due(hinted=False)
    pager.tick()
    assert away.kv is KVPlace.HOST and later.kv is KVPlace.DEVICE and idle.kv is KVPlace.DEVICE
    assert pager.metrics.counters["prefetches_deferred"] == 1
    pool.free(idle.block_table)                            # room appears: the guess may use it
    idle.block_table = []
    pager.tick()
    assert away.kv is KVPlace.DEVICE and later.kv is KVPlace.DEVICE


def test_a_prefetch_evicts_nobody_while_queued_requests_wait_for_room():
    """Admission order decides who gets room next; the prefetched session restores when admitted."""
    pager, pool, away, later, idle = full_pool_with_a_prefetch_due(hinted=True)
    queued = waiting_session(4, 6, 2)                      # needs 2 blocks, none free
    queued.state = SessionState.WAITING
    pager.sessions[queued.id] = queued
    pager.tick()
    assert away.kv is KVPlace.HOST and later.kv is KVPlace.DEVICE
    assert pager.metrics.counters["prefetches_deferred"] == 1


def exp1(tmp_path, *flags):
    return exp1_agents.main(["--model", "random:tiny", "--device", "cpu", "--context", "96", "--growth", "16",
                             "--new-tokens", "8", "--turns", "3", "--no-resident", "--no-hf",
                             "--out", str(tmp_path / "exp1.json"), *flags])


def agent_history(seed: int, outputs: list[list[int]], context=96, growth=16) -> list[int]:
    """What the agent of experiments/exp1_agent.py sent, with the model's replies between."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, TINY_VOCAB) for _ in range(n)]  # noqa: E731
    history = ids(context)
    for out in outputs:
        history += out + ids(growth)
    return history


def test_exp1_agents_get_the_same_tokens_under_every_policy_and_right_hints_never_restore(tmp_path):
    """Light enough load that the room exists: each restore of lru is a prefetch for semantic."""
    result = exp1(tmp_path, "--agents", "5", "--rate", "2", "--tool-min", "0.6", "--tool-max", "1.0",
                  "--oversubscribe", "1.5", "--policies", "semantic,lru", "--daemon-flags", "--prefetch-lead-ms 200")
    semantic, lru = result["rows"]
    for r in result["rows"]:
        assert r["finished"] == 5 and r["turns"] == 15 and r["tokens_match"], r["errors"]
    assert lru["reactive_restores"] > 0         # the pool was oversubscribed
    assert semantic["swaps_by_cause"].get("in_prefetch", 0) > 0
    assert semantic["reactive_restores"] == 0 and "in_active" not in semantic["swaps_by_cause"]
    assert "swapped" not in semantic["ttft_by_path"]
    hf = hf_reference(build_random("tiny", 0, torch.float32, "cpu"))
    first, second, third = semantic["tokens"][0]
    seed = result["args"]["seed"] * 100003
    assert third == hf_greedy(hf, agent_history(seed, [first, second]), 8)


def test_a_burst_of_agents_all_finish_without_hints_and_none_waits_long(tmp_path):
    result = exp1(tmp_path, "--agents", "8", "--rate", "1000", "--tool-min", "0.3", "--tool-max", "0.5",
                  "--oversubscribe", "4", "--no-hints", "--policies", "semantic")
    [r] = result["rows"]
    assert r["finished"] == 8 and r["turns"] == 24 and r["refused"] == 0, r["errors"]
    assert r["swap_bytes_out"] > 0                      # really oversubscribed
    assert r["ttft_first_ms"]["max"] < 5000 and r["ttft_resumed_ms"]["max"] < 5000


def test_a_session_without_hints_is_prefetched_once_the_daemon_has_seen_two_of_its_tool_calls(tmp_path):
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.125",   # 8 blocks
                          "--prefetch-lead-ms", "300")
    try:
        with libdjinn.connect(daemon.socket) as djinn:
            s = djinn.session()
            s.generate(prompt_ids=random_prompts(TINY_VOCAB, [40], seed=3)[0], max_new_tokens=4, ignore_eos=True)
            for i in range(3):
                with s.tool_call():                    # no expected_s: the daemon learns this session's
                    called = time.monotonic()
                    filler = djinn.session()           # someone else needs the room meanwhile
                    filler.generate(prompt_ids=random_prompts(TINY_VOCAB, [82], seed=i)[0], max_new_tokens=2)
                    filler.close()
                    time.sleep(max(0.0, called + 1.5 - time.monotonic()))     # every call takes 1.5 s
                s.generate(prompt_ids=[5], max_new_tokens=4, ignore_eos=True)
            swaps, status = djinn.request("swaps"), djinn.status()
            with pytest.raises(libdjinn.BadRequest, match="expected_s"):
                s.signal_phase("IO_WAIT", expected_s=-1)
            with pytest.raises(libdjinn.BadRequest, match="tool"):
                s.signal_phase("IO_WAIT", tool="x" * 500)
    finally:
        stop_daemon(daemon)
    mine = [(w["direction"], w["cause"]) for w in swaps["recent"] if w["session"] == s.id]
    assert mine == [("out", "pressure"), ("in", "active")] * 2 + [("out", "pressure"), ("in", "prefetch")]
    assert status["counters"]["tool_durations_estimated"] == 1


def test_exp3_sessions_paused_at_breakpoints_under_pressure_keep_their_tokens(tmp_path):
    result = exp1_agents.main(["--exp3", "--exp3-sessions", "5", "--exp3-pause-s", "0.5", "--exp3-context", "64",
                               "--model", "random:tiny", "--device", "cpu", "--growth", "16", "--new-tokens", "8",
                               "--turns", "2", "--out", str(tmp_path / "exp3.json")])
    pressured = result["pressured"]
    assert pressured["finished"] == 5 and result["sessions_with_equal_tokens"] == 5, pressured["errors"]
    assert pressured["kv_pool_peak_bytes"] <= pressured["kv_pool_bytes"] < result["workload"]["total_kv_bytes"]
    assert pressured["swaps_out"] > 0 and pressured["paused_max"] >= 2
