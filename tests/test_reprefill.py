"""Dropped KV is prefilled again ahead of the agent's return while the engine is idle (semantic only),
without evicting anyone and without holding back a request that comes meanwhile. The engine is
driven one iteration at a time from the test, so "meanwhile" is exact."""
import functools
import queue

import pytest
import torch

from conftest import random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine import commands as cmd
from djinnd.session import KVPlace, SamplingParams

BLOCK_MIB = 2 * 4 * 16 * 2 * 16 * 4 / 2**20      # random:tiny, fp32: one 16-token block of all layers' K and V
CHUNK = 32                                        # max_num_batched_tokens
NEW = 8
A1, A2, B1, B2, C1 = random_prompts(512, [150, 20, 40, 10, 200], seed=3)


def engine_of(policy: str, blocks: int, reprefill: bool = True, device: str = "cpu"):
    return build_engine(load_config(None, {
        "model": "random:tiny", "device": device, "dtype": "float32", "policy": policy,
        "kv_cache_mb": (blocks + 1) * BLOCK_MIB, "host_arena_mb": 0, "prefetch_lead_ms": 60_000,
        "max_num_batched_tokens": CHUNK, "reprefill": reprefill}))


@pytest.fixture
def make_engine():
    made = []
    yield lambda policy, blocks=20, **kw: made.append(engine_of(policy, blocks, **kw)) or made[-1]
    for e in made:
        e.arena.close()


def call(engine, make) -> queue.Queue:
    events = queue.Queue()
    engine.inbox.put(make(events.put))
    return events


def until(engine, done, what: str, iterations: int = 2000):
    for _ in range(iterations):
        if done():
            return
        engine._iterate()
    raise AssertionError(f"never happened: {what}")


def reply(engine, make):
    events = call(engine, make)
    until(engine, lambda: not events.empty(), "a reply")
    return events.get().payload


def open_session(engine) -> int:
    return reply(engine, lambda r: cmd.OpenSession(0, 0, r))["session"]


def phase(engine, sid: int, name: str, expected_s: float | None = None):
    reply(engine, lambda r: cmd.SetPhase(0, sid, name, expected_s, r))


def submit(engine, sid: int, prompt) -> queue.Queue:
    return call(engine, lambda r: cmd.Generate(0, sid, list(prompt), SamplingParams(max_new_tokens=NEW,
                                                                                     ignore_eos=True), r))


def finish(engine, events: queue.Queue) -> cmd.Done:
    out = []

    def ended() -> bool:
        while not events.empty():
            out.append(events.get())
        return bool(out) and isinstance(out[-1], (cmd.Done, cmd.Failed))
    until(engine, ended, "the request's end")
    assert isinstance(out[-1], cmd.Done), out[-1]
    return out[-1]


def turn(engine, sid: int, prompt, expected_s: float | None = 5.0) -> cmd.Done:
    done = finish(engine, submit(engine, sid, prompt))
    if expected_s is not None:
        phase(engine, sid, "IO_WAIT", expected_s)
    return done


@pytest.fixture(scope="module")
def reference():
    return reference_on("cpu")


@functools.cache
def reference_on(device: str) -> dict:
    """A's and B's tokens in a pool that holds everyone: nothing is ever evicted."""
    engine = engine_of("semantic", 200, device=device)
    try:
        a, b = open_session(engine), open_session(engine)
        return {"a": [turn(engine, a, A1).tokens, turn(engine, a, A2).tokens],
                "b": [turn(engine, b, B1).tokens, turn(engine, b, B2).tokens]}
    finally:
        engine.arena.close()


def pressure(engine, close_c: bool = True) -> tuple:
    """A (10 blocks, due back in 5 s) and B (3 blocks, due back sooner) in tool calls; C's 13 blocks
    need A's room and the arena holds nothing, so A's KV is dropped; then C closes (or stays).
    prefetch_lead_ms is a minute: every return is near, so re-prefills are due at once."""
    a, b, c = open_session(engine), open_session(engine), open_session(engine)
    first = {"a": turn(engine, a, A1, 5.0).tokens, "b": turn(engine, b, B1, 1.0).tokens}
    turn(engine, c, C1, None)
    sa, sb = engine.sessions[a], engine.sessions[b]
    assert sa.kv is KVPlace.DROPPED and sb.kv is KVPlace.DEVICE
    if close_c:
        reply(engine, lambda r: cmd.CloseSession(0, c, r))
    return sa, sb, first


def counter(engine, name: str) -> float:
    return engine.metrics.counters.get(name, 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dropped_kv_is_prefilled_again_before_the_return_and_the_next_turn_is_exact(make_engine, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reference = reference_on(device)
    engine = make_engine("semantic", device=device)
    a, b, first = pressure(engine)
    b_blocks, moves = list(b.block_table), counter(engine, "swaps_out") + counter(engine, "kv_drops_device")
    until(engine, lambda: counter(engine, "kv_reprefills") == 1, "the re-prefill")
    assert a.kv is KVPlace.DEVICE and a.num_cached == len(a.tokens) - 1
    assert counter(engine, "kv_reprefill_tokens") + counter(engine, "kv_reprefill_reused_tokens") == a.num_cached
    assert b.block_table == b_blocks and b.kv is KVPlace.DEVICE                    # nobody made room for it
    engine.pool.check_integrity([s.block_table for s in engine.sessions.values()])
    engine.pager.prefix.check_integrity()
    assert counter(engine, "swaps_out") + counter(engine, "kv_drops_device") == moves
    status = reply(engine, lambda r: cmd.Status(r))
    assert status["counters"]["kv_reprefills"] == 1
    phase(engine, a.id, "ACTIVE")
    second = turn(engine, a.id, A2)
    assert second.cached_tokens == len(A1) + NEW - 1       # found all its history resident
    assert [first["a"], second.tokens] == reference["a"]


def test_a_request_that_comes_mid_way_goes_first_and_the_returning_agent_continues_from_there(make_engine, reference):
    engine = make_engine("semantic")
    a, b, first = pressure(engine)
    phase(engine, b.id, "ACTIVE")
    fed = a.num_cached
    assert 0 < fed < len(a.tokens) - 1 and counter(engine, "kv_reprefill_tokens") > 0
    events = submit(engine, b.id, B2)
    engine._iterate()                                    # the next iteration serves B, not A's re-prefill
    assert a.num_cached == fed
    assert [first["b"], finish(engine, events).tokens] == reference["b"]
    phase(engine, a.id, "ACTIVE")                       # A comes back before its re-prefill is done
    second = turn(engine, a.id, A2)
    assert second.cached_tokens >= fed and counter(engine, "kv_reprefills") == 0
    engine.pool.check_integrity([s.block_table for s in engine.sessions.values()])
    assert [first["a"], second.tokens] == reference["a"]


def test_no_reprefill_without_room_and_none_that_evicts(make_engine):
    """B and C hold their KV; the free blocks cannot hold all of A's history above the low-water
    mark, so A stays dropped rather than take room from anyone."""
    engine = make_engine("semantic")
    a, b, _ = pressure(engine, close_c=False)
    assert engine.reprefill.due_in() is None
    engine._iterate()                                    # idle: a re-prefill would start here
    assert a.kv is KVPlace.DROPPED and counter(engine, "kv_reprefill_tokens") == 0 and b.kv is KVPlace.DEVICE


@pytest.mark.parametrize("policy, reprefill", [("lru", True), ("recompute", True), ("semantic", False)])
def test_baselines_never_reprefill(make_engine, reference, policy, reprefill):
    engine = make_engine(policy, reprefill=reprefill)
    a, _, first = pressure(engine)
    engine._iterate()                                    # idle: a re-prefill would start here
    assert a.kv is KVPlace.DROPPED and counter(engine, "kv_reprefill_tokens") == 0
    phase(engine, a.id, "ACTIVE")
    second = turn(engine, a.id, A2)
    assert second.cached_tokens == 0 and [first["a"], second.tokens] == reference["a"]


def test_a_failed_reprefill_drops_that_kv_and_the_engine_goes_on(make_engine, reference, monkeypatch):
    """Regression guard: a fault in a re-prefill's forward costs that re-prefill, not the engine."""
    engine = make_engine("semantic")
    forward = engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward", lambda chunks, **kw: 1 / 0 if chunks[0][0].request is None
                        else forward(chunks, **kw))                # requests' forwards run as ever
    a, _, first = pressure(engine)
    until(engine, lambda: counter(engine, "kv_reprefill_errors") == 1, "the failure")
    assert a.kv is KVPlace.DROPPED and not a.block_table
    assert engine.reprefill.due_in() is None                         # not tried again in this tool call
    monkeypatch.undo()
    phase(engine, a.id, "ACTIVE")
    assert [first["a"], turn(engine, a.id, A2).tokens] == reference["a"]


def test_known_blocks_of_a_dropped_history_are_taken_back_and_only_the_rest_is_fed(make_engine, reference):
    """The drop leaves A's full blocks in the prefix cache (nothing reclaimed them): the re-prefill
    takes them as they are and computes only the tail."""
    engine = make_engine("semantic")
    a = engine.sessions[open_session(engine)]
    first = turn(engine, a.id, A1).tokens
    engine.pager.drop_kv(a)                      # the engine runs in this thread: nothing else moves
    until(engine, lambda: counter(engine, "kv_reprefills") == 1, "the re-prefill")
    target = len(A1) + NEW - 1
    assert counter(engine, "kv_reprefill_reused_tokens") == target // 16 * 16
    assert counter(engine, "kv_reprefill_tokens") == target % 16
    phase(engine, a.id, "ACTIVE")
    assert [first, turn(engine, a.id, A2).tokens] == reference["a"]
