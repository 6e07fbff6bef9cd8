"""Three tiers of KV, one policy: device, host arena, dropped. A full arena drops the KV cheapest to
lose (furthest return, shortest context) instead of refusing work that fits the pool."""
import threading
import time

import pytest
import torch

from djinnd.session import KVPlace, Phase, SessionState
from test_scheduler import pool_of, scheduler_of, waiting_session


def hold(pager, sid: int, tokens: int, expected_s: float | None = None):
    """An idle session holding the KV of `tokens` tokens on the device (4 per block), in a tool
    call due back in expected_s (None: idle, return unknown)."""
    s = waiting_session(sid, tokens, 0)
    s.request, s.num_cached = None, tokens
    s.block_table = pager.pool.allocate(pager.pool.blocks_for(tokens))
    pager.sessions[s.id] = s
    if expected_s is not None:
        pager.on_phase(s, Phase.IO_WAIT, expected_s)
    return s


def to_host(pager, *sessions):
    for s in sessions:
        assert pager.evict(s, "pressure") and s.kv is KVPlace.HOST
    pager.poll()                                # CPU copies are synchronous: done now


def test_a_full_arena_drops_the_host_kv_due_back_last_and_takes_the_victim():
    pager = scheduler_of(pool_of(8), "semantic", host_blocks=4).pager
    soon, late = hold(pager, 1, 8, expected_s=5), hold(pager, 2, 8, expected_s=100)
    to_host(pager, soon, late)                                  # the arena is full
    victim = hold(pager, 3, 8, expected_s=50)
    assert pager.evict(victim, "pressure")
    assert (late.kv, victim.kv, soon.kv) == (KVPlace.DROPPED, KVPlace.HOST, KVPlace.HOST)
    assert late.num_cached == 0 and not late.host_runs and pager.arena.num_free == 0
    assert pager.metrics.counters["kv_drops_host"] == 1


def test_the_victim_itself_is_dropped_when_it_is_the_cheapest_to_lose():
    pager = scheduler_of(pool_of(8), "semantic", host_blocks=4).pager
    soon, sooner = hold(pager, 1, 8, expected_s=5), hold(pager, 2, 8, expected_s=2)
    to_host(pager, soon, sooner)
    victim = hold(pager, 3, 8, expected_s=1000)
    assert pager.evict(victim, "pressure")
    assert victim.kv is KVPlace.DROPPED and not victim.block_table and pager.pool.num_free == 8
    assert soon.kv is KVPlace.HOST and sooner.kv is KVPlace.HOST


def test_idle_sessions_away_as_long_lose_the_shortest_context_first():
    """Recompute cost grows with length; a return not known is expected in as long again as the
    session has been away."""
    pager = scheduler_of(pool_of(12), "semantic", host_blocks=6).pager
    long, short = hold(pager, 1, 16), hold(pager, 2, 8)
    long.last_used = short.last_used = time.monotonic() - 10
    to_host(pager, long, short)
    victim = hold(pager, 3, 8, expected_s=5)
    assert pager.evict(victim, "pressure")
    assert (short.kv, long.kv, victim.kv) == (KVPlace.DROPPED, KVPlace.HOST, KVPlace.HOST)


def test_a_session_that_just_finished_a_turn_is_not_dropped_before_one_idle_for_long():
    pager = scheduler_of(pool_of(8), "semantic", host_blocks=2).pager
    stale = hold(pager, 1, 8)
    stale.last_used = time.monotonic() - 600
    to_host(pager, stale)
    just_done = hold(pager, 2, 4)           # shorter, but its agent is about to send the next turn
    assert pager.evict(just_done, "pressure")
    assert (stale.kv, just_done.kv) == (KVPlace.DROPPED, KVPlace.HOST)


def test_lru_drops_the_least_recently_used():
    pager = scheduler_of(pool_of(8), "lru", host_blocks=4).pager
    old, new = hold(pager, 1, 8), hold(pager, 2, 8)
    old.last_used, new.last_used = 1.0, 2.0
    to_host(pager, old, new)
    victim = hold(pager, 3, 8)
    assert pager.evict(victim, "pressure")
    assert (old.kv, new.kv, victim.kv) == (KVPlace.DROPPED, KVPlace.HOST, KVPlace.HOST)


def test_a_paused_session_is_never_dropped_and_queued_host_kv_stays():
    pager = scheduler_of(pool_of(8), "semantic", host_blocks=2).pager
    queued = hold(pager, 1, 8)
    to_host(pager, queued)
    queued.state = SessionState.WAITING                         # about to come back: not droppable
    paused = hold(pager, 2, 8)
    paused.state = SessionState.PAUSED                          # mid-forward KV cannot be rebuilt
    assert not pager.evict(paused, "pressure")
    assert paused.kv is KVPlace.DEVICE and queued.kv is KVPlace.HOST


def test_lazy_eviction_never_drops():
    pager = scheduler_of(pool_of(8), "semantic", host_blocks=0).pager
    far = hold(pager, 1, 8, expected_s=100)
    assert not pager.evict(far, "lazy", may_drop=False) and far.kv is KVPlace.DEVICE


@pytest.mark.parametrize("policy", ["semantic", "lru"])
def test_a_request_that_fits_the_pool_is_served_when_the_arena_is_full(policy):
    """The issue's finding in miniature: 'needs 6 KV blocks, 0 free and none can be freed' before."""
    sched = scheduler_of(pool_of(8), policy, host_blocks=2)
    a, b = hold(sched.pager, 1, 16, expected_s=30), hold(sched.pager, 2, 16, expected_s=60)
    new = waiting_session(3, 20, 4)                             # 6 blocks
    sched.pager.sessions[new.id] = new
    sched.add(new)
    for _ in range(3):
        sched.schedule()
        sched.pager.poll()
    assert not sched.refused and new.state is SessionState.RUNNING
    assert KVPlace.DROPPED in (a.kv, b.kv)
    sched.pool.check_integrity([s.block_table for s in (a, b, new)])


def test_a_prefetch_drops_a_session_due_back_later_when_the_arena_is_full():
    pager = scheduler_of(pool_of(4), "semantic", host_blocks=2).pager
    away = hold(pager, 1, 8, expected_s=0.0)
    to_host(pager, away)                                        # due back now; the arena is full
    later, idle = hold(pager, 2, 8, expected_s=100), hold(pager, 3, 8)
    idle.last_used = time.monotonic()
    pager.tick()
    pager.poll()
    assert away.kv is KVPlace.DEVICE and len(away.block_table) == 2
    assert later.kv is KVPlace.DROPPED and idle.kv is KVPlace.DEVICE
    pager.pool.check_integrity([away.block_table, idle.block_table])


@pytest.mark.parametrize("device, policy", [("cpu", "semantic"), ("cpu", "lru"),
                                            pytest.param("cuda", "semantic", marks=pytest.mark.gpu)])
def test_long_profile_paging_exact_with_kv_dropped_and_recomputed(device, policy):
    """check_paging_exact's long profile in miniature (fp32): one request at a time, a pool for two
    agents and an arena for one, so KV goes to the host and is dropped; tokens equal an unpaged run.
    On CUDA the copies run on side streams while drops free host blocks."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from experiments.check_paging_exact import history_tokens, pool_mib, run_agents
    shape = dict(agents=4, turns=4, context=96, growth=(16, 48), new_tokens=8, tool_s=0.02)
    size = lambda n: pool_mib("random:tiny", device, "float32", history_tokens(4, 96, 48, 8), n)  # noqa: E731
    reference, _ = run_agents("random:tiny", device, "float32", "none", size(4), 0, **shape)
    paged, counters = run_agents("random:tiny", device, "float32", policy, size(2), size(1), **shape)
    assert counters["swaps_out"] > 0 and counters["resumed_dropped"] > 0 and counters["recomputed_tokens"] > 0
    assert paged == reference


def test_a_turn_whose_kv_is_on_the_host_is_admitted_once_its_restore_fits():
    """test_gpu_policies' agents on CPU (fp32): six agents one request at a time, a pool for two and
    an arena for all. A turn whose KV waits on the host needs room for all it restores (its shared
    prefix blocks no one holds, its private ones) before the rest of its reservation; counting only
    the reservation admitted it into a pool short of its restore, which then failed on every step:
    the turn never ran. Tokens equal an unpaged run."""
    from experiments.check_paging_exact import history_tokens, pool_mib, run_agents
    shape = dict(agents=6, turns=3, context=96, growth=16, new_tokens=8, tool_s=0.02)
    size = lambda n: pool_mib("random:tiny", "cpu", "float32", history_tokens(3, 96, 16, 8), n)  # noqa: E731
    reference, _ = run_agents("random:tiny", "cpu", "float32", "none", size(6), 0, **shape)
    runs = []                   # in a daemon thread: a turn that never runs fails the test, not hangs it
    paging = threading.Thread(target=lambda: runs.append(run_agents("random:tiny", "cpu", "float32", "semantic",
                                                                    size(2), size(6), **shape)), daemon=True)
    paging.start()
    paging.join(120)
    assert runs, "a turn never ran"
    paged, counters = runs[0]
    assert counters["swaps_in_prefetch"] > 0 and counters["swaps_out_prefetch_room"] > 0
    assert paged == reference
