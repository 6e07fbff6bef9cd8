"""Shared prefix KV, without a model: content keys, reference counts, copy-on-write, the cache's
reclaim order, paging of shared blocks and sessions closed while others share their blocks."""
import itertools
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from djinnd.engine import aborts
from djinnd.memory.prefix_cache import block_key, root_key
from djinnd.session import KVPlace, Phase, Request, SamplingParams, Session, SessionState
from test_scheduler import pool_of, scheduler_of

BS = 4      # tokens per block in these tests


def session(sid: int, tokens: list[int], max_new=1, root=b"r" * 16) -> Session:
    s = Session(sid, owner=0, owner_pid=0, tokens=list(tokens), prefix_root=root)
    s.request = Request(SamplingParams(max_new_tokens=max_new), len(tokens), num_cached=0)
    return s


def run(sched, *sessions):
    """Admit the sessions, feed their prompts whole (as a forward would) and end their requests."""
    for s in sessions:
        sched.pager.sessions[s.id] = s
        sched.add(s)
    sched.schedule()
    for s in sessions:
        assert s.state is SessionState.RUNNING, "not admitted"
        s.num_cached = len(s.tokens)
        s.tokens.append(99)          # the sampled token
        sched.finish(s)
        s.request = None
    sched.pager.poll()


def again(s: Session, prompt: list[int], max_new=1):
    s.tokens += prompt
    s.request = Request(SamplingParams(max_new_tokens=max_new), len(prompt), num_cached=s.num_cached)


def integrity(sched):
    sessions = sched.pager.sessions.values()
    in_flight = [b for t in sched.pager.swapper.in_flight for b in t.free_device] + sched.pager.prefix.spills
    sched.pool.check_integrity([s.block_table for s in sessions], in_flight)
    sched.pager.prefix.check_integrity()
    swapped = Counter(k for s in sessions if s.kv is KVPlace.HOST for k in s.block_keys)
    assert {k: b.num_swapped for k, b in sched.pager.prefix.known.items() if b.num_swapped} == swapped


PREFIX = list(range(100, 112))          # three full blocks


def test_keys_chain_every_token_before_them_and_the_sharing_scope():
    r = root_key("user", 1000, 5)
    a = [block_key(r, PREFIX[:4])]
    a.append(block_key(a[0], PREFIX[4:8]))
    other_first = block_key(r, [7] + PREFIX[1:4])
    assert block_key(other_first, PREFIX[4:8]) != a[1]      # same tokens after a different block
    assert block_key(r, PREFIX[:4]) == a[0]                 # deterministic: no per-process hash seed
    assert root_key("user", 1001, 5) != r and root_key("user", 1000, 6) == r
    assert root_key("group", 1000, 5) == root_key("group", 1001, 5) != root_key("group", 1000, 6)
    assert root_key("all", 1, 2) == root_key("all", 3, 4) not in (r, root_key("group", 1000, 5))
    assert root_key("off", 1000, 5) is None


def test_reference_counts_cache_known_blocks_and_reclaim_the_least_recently_used():
    pool, reclaimed = pool_of(4), []
    pool.on_reclaim = reclaimed.append
    a = pool.allocate(3)
    pool.known.update(a)
    pool.share(a[0])
    pool.free(a)                               # a[0] keeps its second holder; the rest are cached
    assert pool.refs[a[0]] == 1 and pool.num_cached == 2 and pool.num_free == 3 and pool.num_used == 1
    assert pool.allocate(1) not in ([a[1]], [a[2]]) and not reclaimed        # a free block first
    assert pool.allocate(1) == [a[1]] and reclaimed == [a[1]]                # then the oldest cached
    pool.share(a[2])                                                        # revived: not reclaimable
    assert not pool.can_allocate(1)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a[1], a[1]])


def test_a_new_prompt_takes_the_known_blocks_and_feeds_only_the_rest():
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = session(1, PREFIX + [1, 2]), session(2, PREFIX + [3, 4, 5, 6, 7])
    run(sched, a)
    sched.pager.sessions[b.id] = b
    assert sched.blocks_needed(b) == pool.blocks_for(len(b.tokens) + 1) - 3    # the shared blocks cost nothing
    sched.add(b)
    sched.schedule()
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert b.num_cached == 12 and b.request.num_cached == 12 and b.num_new_tokens == 5
    assert all(pool.refs[x] == 2 for x in a.block_table[:3])
    assert sched.pager.prefix.num_hit_tokens == 12
    integrity(sched)


def test_the_whole_prompt_known_still_feeds_its_last_token_and_duplicates_merge_at_the_end():
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = session(1, PREFIX + [1]), session(2, PREFIX)
    run(sched, a)
    sched.pager.sessions[b.id] = b
    sched.add(b)
    sched.schedule()
    assert b.block_table[:2] == a.block_table[:2] and b.num_new_tokens == 4
    assert b.block_table[2] != a.block_table[2]       # its last block is fed: a block of its own
    own = b.block_table[2]
    b.num_cached = len(b.tokens)
    b.tokens.append(99)
    sched.finish(b)                                   # out of the batch: the duplicate is merged
    assert b.block_table[:3] == a.block_table[:3] and pool.refs[own] == 0 and own not in pool.cached
    integrity(sched)


def test_a_waiting_prompt_is_hashed_once_and_a_prompt_taken_back_takes_its_keys(monkeypatch):
    """The scheduler looks a waiting prompt up every step: each block is hashed once per session.
    A prompt refused or cancelled before it ran is cut off again, and its keys with it, so the
    next prompt is looked up by its own tokens, never by the keys of the one before."""
    import djinnd.memory.prefix_cache as prefix_cache
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    run(sched, session(1, PREFIX + [1]))
    hashed = []
    monkeypatch.setattr(prefix_cache, "block_key", lambda parent, tokens: hashed.append(1) or block_key(parent, tokens))
    b = session(2, PREFIX + [2])
    for _ in range(5):
        assert len(sched.pager.prefix.lookup(b)) == 3
    assert len(hashed) == 3
    b.cut_tokens(0)
    b.tokens += [7] * 12 + [2]
    assert sched.pager.prefix.lookup(b) == []


def test_other_roots_share_nothing():
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b, c = session(1, PREFIX + [1]), session(2, PREFIX + [1], root=b"x" * 16), session(3, PREFIX + [1], root=None)
    run(sched, a, b, c)
    assert not set(a.block_table) & set(b.block_table) and not set(a.block_table) & set(c.block_table)
    assert c.block_keys == [] and sched.pager.prefix.num_hit_tokens == 0


def test_cutting_history_inside_a_shared_block_copies_it_before_writing():
    """Copy-on-write: a session that keeps half of a shared block gets a copy of it when it next
    writes; the sharer's block is untouched and its K/V reused, not fed again."""
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = session(1, PREFIX + [1]), session(2, PREFIX + [2])
    run(sched, a)
    run(sched, b)
    shared = list(a.block_table[:3])
    pool.k[:, shared[1]] = 1.5
    sched.pager.truncate(b, 6)                  # inside the second shared block
    assert b.num_cached == 6 and b.block_table == shared[:2] and len(b.block_keys) == 2
    again(b, [50, 51])
    sched.add(b)
    sched.schedule()
    copy = b.block_table[1]
    assert b.block_table[0] == shared[0] and copy not in shared and bool((pool.k[:, copy] == 1.5).all())
    assert b.num_new_tokens == 2 and b.block_keys == a.block_keys[:1] and a.block_table[:3] == shared
    assert pool.refs[shared[1]] == 1 and copy not in pool.known
    integrity(sched)


def test_a_cancelled_request_cut_inside_its_own_known_block_takes_it_out_of_the_cache():
    """finish() after an abort: num_cached points inside a block that became known meanwhile and
    nobody else holds; the next request writes into it only once the cache has forgotten it."""
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a = session(1, PREFIX + [1])
    run(sched, a)
    again(a, list(range(200, 210)))
    sched.add(a)
    sched.schedule()
    a.num_cached = len(a.tokens)
    sched.pager.prefix.register(a, may_move=False)      # the prompt's blocks became known mid-request
    a.cut_tokens(14)                                    # the abort cuts the history back ...
    a.num_cached = 14                                   # ... to inside the fourth block, now known
    sched.finish(a)
    assert len(a.block_keys) == 4 and a.num_cached == 14 and len(a.block_table) == 4
    block = a.block_table[3]
    again(a, [5])
    sched.add(a)
    sched.schedule()
    assert len(a.block_keys) == 3 and a.block_table[3] == block and block not in pool.known
    integrity(sched)


def test_cached_blocks_are_reclaimed_before_any_session_is_paged():
    pool = pool_of(10, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    gone, idle = session(1, PREFIX + [1]), session(2, [5, 6, 7, 8, 9, 10, 11, 12, 13])
    run(sched, gone, idle)
    sched.drop(gone)                            # its 4 blocks: 3 known (cached), 1 free
    assert pool.num_cached == 3 and pool.num_free == 10 - len(idle.block_table)
    new = session(3, list(range(300, 324)))     # 7 blocks: takes the free ones, then the cached
    run(sched, new)
    assert idle.kv is KVPlace.DEVICE and sched.pager.metrics.counters.get("swaps_out", 0) == 0
    assert pool.num_cached == 0 and not sched.pager.prefix.known.keys() & set(gone.block_keys)
    integrity(sched)


def shared_pair(sched):
    a, b = session(1, PREFIX + [1, 2]), session(2, PREFIX + [3, 4])
    run(sched, a)
    run(sched, b)
    return a, b


def test_evicting_a_sharer_copies_only_its_private_blocks_while_another_holds_the_shared_ones():
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = shared_pair(sched)
    shared = a.block_table[:3]
    pager = sched.pager
    assert pager.evict(a, "test")
    assert pager.swapper.in_flight[-1].nbytes == 1 * pool.block_bytes      # its private block only
    assert pager.evict(b, "test")
    assert pager.swapper.in_flight[-1].nbytes == 4 * pool.block_bytes      # the last holder: 3 shared + 1
    pager.poll()
    assert pager.arena.num_used == 5 and pool.num_cached == 3 and all(pool.refs[x] == 0 for x in shared)
    again(a, [9])
    run(sched, a)                              # the shared blocks are still on the device
    assert a.block_table[:3] == shared and pager.metrics.counters["swap_bytes_in"] == pool.block_bytes
    assert pager.arena.num_used == 4           # b still needs the host copies of the shared blocks
    integrity(sched)


def test_the_last_holder_leaving_copies_the_shared_blocks_a_swapped_session_needs():
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = shared_pair(sched)
    sched.pager.evict(a, "test")               # b holds the shared blocks: only a's own block is copied
    sched.pager.poll()
    sched.drop(b)                              # nobody on the device needs them now, a still does
    assert len(sched.pager.prefix.spills) == 3
    integrity(sched)
    sched.pager.poll()                         # one copy to the host ...
    assert sched.pager.arena.num_used == 4 and not sched.pager.prefix.spills
    sched.pager.poll()                         # ... then they are cached like the rest
    assert sched.pager.metrics.counters["swaps_out_spill"] == 1 and pool.num_cached == 3
    integrity(sched)


def test_swap_in_copies_shared_blocks_back_once_they_left_the_device():
    pool = pool_of(8, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = shared_pair(sched)
    sched.pager.evict(a, "test")
    sched.pager.evict(b, "test")
    sched.pager.poll()
    filler = session(3, list(range(300, 327)))  # takes every block: the cached shared ones go
    run(sched, filler)
    sched.drop(filler)
    again(b, [9])
    run(sched, b)
    again(a, [9])
    run(sched, a)
    assert a.block_table[:3] == b.block_table[:3]         # copied back once, then shared again
    assert sched.pager.arena.num_used == 0                # no swapped session needs a host copy now
    integrity(sched)


def test_a_session_that_waited_for_another_sessions_copy_in_frees_its_blocks_when_closed():
    """Regression (soak: 13 KV blocks used with no session left): a session that took shared blocks
    while another session's copy in still filled them kept that copy in its transfers after it
    finished, so closing it handed its blocks to a finished copy that never freed them."""
    pool = pool_of(8, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = shared_pair(sched)
    sched.pager.evict(a, "test")
    sched.pager.evict(b, "test")
    sched.pager.poll()
    filler = session(3, list(range(300, 327)))  # takes every block: the shared ones live on the host only
    run(sched, filler)
    sched.drop(filler)
    sched.drop(a)
    again(b, [9])
    c = session(4, PREFIX + [5])
    run(sched, b, c)                            # b's copy in fills the shared blocks; c takes them meanwhile
    assert c.num_cached == len(PREFIX) + 1 and not c.transfers
    sched.drop(c)
    sched.drop(b)
    sched.pager.poll()
    assert pool.num_used == 0 and sched.pager.arena.num_used == 0
    integrity(sched)


def test_a_session_closed_while_its_blocks_are_shared_leaves_them_to_the_sharer():
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "lru", host_blocks=20)
    a, b = shared_pair(sched)
    shared = a.block_table[:3]
    sched.drop(a)
    assert all(pool.refs[x] == 1 for x in shared) and b.block_table[:3] == shared
    integrity(sched)
    sched.pager.evict(b, "test")
    sched.pager.poll()
    sched.drop(b)                               # closed while swapped out: host copies go too
    assert sched.pager.arena.num_used == 0 and pool.num_cached == 3 and pool.num_used == 0
    integrity(sched)


def test_recompute_drops_private_kv_and_takes_the_shared_prefix_back():
    pool = pool_of(20, BS)
    sched = scheduler_of(pool, "recompute", host_blocks=0)
    a, b = shared_pair(sched)
    sched.pager.evict(a, "test")
    assert a.kv is KVPlace.DROPPED and all(pool.refs[x] == 1 for x in b.block_table[:3])
    again(a, [9])
    sched.add(a)
    sched.schedule()
    assert a.block_table[:3] == b.block_table[:3] and a.num_cached == 12
    integrity(sched)


# ---- in-process engine: who shares with whom, and the tokens ---------------------------------

def engine_of(scope: str):
    from djinnd.config import load_config
    from djinnd.daemon import build_engine
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "dtype": "float32",
                                             "kv_cache_mb": 1, "prefix_sharing": scope}))
    engine.start()
    return engine


def generate_as(engine, uid: int, gid: int, prompt: list[int]):
    """A session opened by a peer of this uid and gid (as SO_PEERCRED reports them): its reply."""
    from djinnd.engine import commands as cmd
    from djinnd.engine.local import LocalClient
    client, params = LocalClient(engine), SamplingParams(max_new_tokens=6, ignore_eos=True)
    sid = client.call(lambda r: cmd.OpenSession(uid, 0, r, uid, gid)).get(timeout=600)[1].payload["session"]
    return client.done(client.call(lambda r: cmd.Generate(uid, sid, prompt, params, r)))[0]


@pytest.mark.parametrize("scope, sharers", [("user", {(1000, 5)}), ("group", {(1000, 5), (1001, 5)})])
def test_only_sessions_in_the_scope_share_and_tokens_do_not_change(scope, sharers):
    engine = engine_of(scope)
    try:
        prompt = list(range(40, 40 + 3 * engine.pool.block_size)) + [7, 8]
        first = generate_as(engine, 1000, 5, prompt)
        others = {who: generate_as(engine, *who, prompt) for who in [(1000, 5), (1001, 5), (1002, 6)]}
    finally:
        engine.stop()
        engine.join()
    assert first.cached_tokens == 0
    for who, done in others.items():
        assert done.tokens == first.tokens
        assert done.cached_tokens == (3 * engine.pool.block_size if who in sharers else 0), who


def test_a_prefetch_takes_the_blocks_of_its_victim_known_ones_included():
    """Regression: a prefetch took only a victim's private blocks, so it was deferred whenever the
    victim's full blocks were known (all of them, with sharing on), and the KV came back late."""
    pool = pool_of(7, BS)
    sched = scheduler_of(pool, "semantic", host_blocks=20)
    a, b = session(1, PREFIX + [1]), session(2, list(range(300, 325)))
    run(sched, a)
    assert sched.pager.evict(a, "pressure")
    sched.pager.poll()
    run(sched, b)                                # takes every block: a's cached ones are reclaimed
    assert sched.pager.prefetch(a, "active", due=0.0)
    assert a.kv is KVPlace.DEVICE and b.kv is KVPlace.HOST and len(a.block_table) == 4
    sched.pager.poll()
    integrity(sched)


# ---- random operations, KV checked token by token ---------------------------------------------

def forward(pool, s: Session):
    """What a forward writes: each uncached position's K (here: its token id) into the block table."""
    for pos in range(s.num_cached, len(s.tokens)):
        pool.k[0, s.block_table[pos // BS], pos % BS, 0, 0] = s.tokens[pos]
    s.num_cached = len(s.tokens)


def assert_kv_is_history(pool, s: Session):
    """Every cached position's K in s's blocks is the token s holds there: nothing was overwritten."""
    for pos in range(s.num_cached):
        assert pool.k[0, s.block_table[pos // BS], pos % BS, 0, 0].item() == s.tokens[pos], (s.id, pos)


def admit_and_run(sched, s: Session, prompt: list[int]) -> bool:
    again(s, prompt, max_new=2)
    sched.add(s)
    for _ in range(4):
        sched.schedule()
        sched.pager.poll()
        if s.state is SessionState.RUNNING:
            break
    if s.state is not SessionState.RUNNING:        # no room this time: the request goes away
        if s in sched.waiting:
            sched.waiting.remove(s)
        sched.refused.clear()
        s.change_state(SessionState.IDLE)
        s.cut_tokens(len(s.tokens) - len(prompt))
        s.request = None
        return False
    assert_kv_is_history(sched.pool, s)
    forward(sched.pool, s)
    s.tokens.append(1000 + sum(s.tokens) % 97)       # the sampled token, fed by the next request
    sched.finish(s)
    s.request = None
    return True


@pytest.mark.parametrize("policy, seed", [("lru", 1), ("lru", 2), ("recompute", 3), ("semantic", 4)])
def test_random_sharing_paging_and_cuts_never_lose_or_overwrite_kv(policy, seed):
    rng = random.Random(seed)
    pool = pool_of(24, BS)
    sched = scheduler_of(pool, policy, host_blocks=40)
    common = [rng.randrange(1, 50) for _ in range(20)]
    sessions = {i: session(i, []) for i in range(1, 7)}
    for s in sessions.values():
        sched.pager.sessions[s.id] = s
    served = 0
    for step in range(160):
        s = rng.choice(list(sessions.values()))
        op = rng.random()
        if op < 0.5:
            prompt = (common[:rng.randrange(0, 21)] if not s.tokens else []) + [rng.randrange(1, 50)
                                                                              for _ in range(rng.randrange(1, 6))]
            served += admit_and_run(sched, s, prompt)
        elif op < 0.65 and s.kv is KVPlace.DEVICE and s.block_table:
            sched.pager.evict(s, "pressure")
        elif op < 0.75 and s.kv is KVPlace.HOST and not s.transfers:
            sched.pager.prefetch(s, "active", due=0.0)
        elif op < 0.88 and s.tokens:
            sched.pager.truncate(s, rng.randrange(0, len(s.tokens)))
        elif op < 0.95:
            sched.drop(s)
            del sessions[s.id]
            sessions[s.id + 100] = fresh = session(s.id + 100, [])
            sched.pager.sessions[fresh.id] = fresh
        sched.pager.poll()
        integrity(sched)
        for v in sessions.values():
            if v.kv is KVPlace.DEVICE and v.block_table:
                assert_kv_is_history(pool, v)
    assert served > 40 and sched.pager.prefix.num_hit_tokens > 0


# ---- requests ended at any point: no block outlives its holders --------------------------------

class EndsRequests:
    """The engine's side of ending a request, as aborts.abort calls it."""
    def __init__(self, sched):
        self.scheduler, self.pager, self.arena = sched, sched.pager, sched.pager.arena
        self.metrics = sched.pager.metrics
        self.replies, self.breaks = {}, SimpleNamespace(discard=lambda s: None)

    def _end(self, s, reason, event):
        self.scheduler.finish(s)
        s.request = None
        self.replies.pop(s.id, None)


def random_step(sched, engine, rng):
    """Admit what fits; each running session decodes a token, ends, pauses or resumes, at random."""
    sched.schedule()
    for s, _ in sched.refused:
        s.cut_tokens(len(s.tokens) - s.request.num_prompt_tokens)
        s.request = None
        s.change_state(SessionState.IDLE)
    sched.refused.clear()
    for s in list(sched.running):
        if s.state is SessionState.PAUSED and s.kv is KVPlace.DEVICE and rng.random() < 0.3:
            s.change_state(SessionState.RUNNING)
        elif s.state is SessionState.RUNNING and rng.random() < 0.7:
            s.num_cached = len(s.tokens)
            s.tokens.append(1000 + s.id)
            s.request.output.append(1000 + s.id)
            if len(s.request.output) >= s.request.params.max_new_tokens:
                engine._end(s, "length", None)
            elif rng.random() < 0.2:
                s.change_state(SessionState.PAUSED)     # at a breakpoint: may be paged meanwhile


@pytest.mark.parametrize("policy, seed", [("lru", 19), ("semantic", 66), ("recompute", 3)])
def test_requests_cancelled_paused_or_closed_at_any_point_leave_no_block_held(policy, seed):
    """Requests queued, admitted, paused, swapped, cut or cancelled at random, with copies left in
    flight between steps: reference counts always match the holders and nothing is held at the end."""
    rng = random.Random(seed)
    pool = pool_of(rng.randrange(15, 24), BS)
    sched = scheduler_of(pool, policy, host_blocks=rng.randrange(2, 30))
    engine, pager = EndsRequests(sched), sched.pager
    common = [rng.randrange(1, 50) for _ in range(20)]

    ids = itertools.count(1)

    def fresh():
        s = session(next(ids), [])
        s.request, pager.sessions[s.id] = None, s
    for _ in range(5):
        fresh()
    for _ in range(600):
        s, op = rng.choice(list(pager.sessions.values())), rng.random()
        if op < 0.25 and s.state is SessionState.IDLE and len(s.tokens) < 10 * BS:
            prompt = common[:rng.randrange(0, 21)] if not s.tokens else []
            prompt += [rng.randrange(1, 50) for _ in range(rng.randrange(1, 6))]
            if rng.random() < 0.2:
                s.prefix_root = None            # breakpoints: the session leaves prefix sharing
            again(s, prompt, max_new=3)
            engine.replies[s.id] = lambda event: None
            sched.add(s)
        elif op < 0.45:
            random_step(sched, engine, rng)
        elif op < 0.55 and s.request is not None:
            aborts.cancel(engine, s)
        elif op < 0.65 and s.kv is KVPlace.DEVICE and s.state is not SessionState.RUNNING and not s.transfers:
            pager.evict(s, "pressure")
        elif op < 0.72 and s.kv is KVPlace.HOST and s.state is SessionState.IDLE and not s.transfers:
            pager.prefetch(s, "active", due=0.0)
        elif op < 0.78 and s.state is SessionState.IDLE and s.tokens:
            pager.truncate(s, rng.randrange(0, len(s.tokens)))
        elif op < 0.85:
            sched.drop(s)
            fresh()
        elif op < 0.90:
            pager.poll()
        elif op < 0.95:
            pager.on_phase(s, rng.choice([Phase.IO_WAIT, Phase.ACTIVE]), rng.choice([None, 0.0, 100.0]))
        else:
            pager.tick()
        in_flight = [b for t in pager.swapper.in_flight for b in t.free_device] + pager.prefix.spills
        pool.check_integrity([v.block_table for v in pager.sessions.values()], in_flight)
        pager.prefix.check_integrity()
    for s in list(pager.sessions.values()):
        if s.request is not None:
            aborts.cancel(engine, s)
        sched.drop(s)
    pager.poll()
    pager.poll()                                # spills copied, then cached
    assert pool.num_used == 0 and pager.arena.num_used == 0
