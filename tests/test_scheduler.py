"""Block pool and scheduler: admission as blocks allow, FIFO waiting, reservations trimmed on finish."""
import torch

from djinnd.engine.pager import Pager
from djinnd.engine.scheduler import Scheduler
from djinnd.memory.block_pool import KVBlockPool, bytes_per_block
from djinnd.memory.host_arena import HostArena
from djinnd.memory.swapper import Swapper
from djinnd.metrics import Metrics
from djinnd.session import Request, SamplingParams, Session, SessionState


def pool_of(num_blocks: int, block_size=4) -> KVBlockPool:
    per = bytes_per_block(2, 1, 8, block_size, torch.float32)
    return KVBlockPool(2, 1, 8, block_size, per * (num_blocks + 1), torch.float32, "cpu")   # + the scratch block


def scheduler_of(pool, policy="none", host_blocks=0, admission="fifo", max_wait_s=5.0) -> Scheduler:
    arena = HostArena(host_blocks, pool.host_block_shape, torch.float32, pin=False)
    pager = Pager(policy, pool, arena, Swapper(pool, arena, "cpu", Metrics()), prefetch_lead_s=0)
    return Scheduler(pool, pager, max_num_seqs=8, max_num_batched_tokens=100, admission=admission,
                     max_wait_s=max_wait_s)


def waiting_session(sid: int, num_prompt: int, max_new: int) -> Session:
    s = Session(sid, owner=0, owner_pid=0, tokens=list(range(num_prompt)))
    s.request = Request(SamplingParams(max_new_tokens=max_new), num_prompt, num_cached=0)
    return s


def test_pool_size_follows_the_budget_and_blocks_are_not_leaked():
    pool = pool_of(10)
    assert pool.num_blocks == 10 and pool.k.shape == (2, 11, 4, 1, 8) and pool.scratch_block == 10
    a, b = pool.allocate(3), pool.allocate(7)
    assert not pool.can_allocate(1)
    pool.check_integrity([a, b])
    pool.free(a)
    assert pool.num_free == 3


def prefilled(*sessions):
    """What the runner does after a prefill: the prompt is cached and one new token waits."""
    for s in sessions:
        s.num_cached = len(s.tokens)
        s.tokens.append(0)


def test_admits_fifo_as_blocks_allow_and_decodes_everyone_running():
    sched = scheduler_of(pool_of(5))
    s1, s2, s3 = (waiting_session(i, 6, 2) for i in (1, 2, 3))   # 2 blocks each
    s4 = waiting_session(4, 1, 1)                                  # 1 block: fits, but queued behind s3
    for s in (s1, s2, s3, s4):
        sched.add(s)
    plan = sched.schedule()
    assert plan.prefill == [(s1, 6), (s2, 6)] and plan.decode == []
    assert s3.state is SessionState.WAITING and s4.state is SessionState.WAITING
    prefilled(s1, s2)
    plan = sched.schedule()
    assert plan.decode == [s1, s2] and plan.prefill == []   # no room for s3: decode the running ones
    sched.finish(s1)                                 # idle: its KV stays resident
    assert sched.schedule().decode == [s2]
    sched.drop(s1)                                   # closed: its blocks go back to the pool
    plan = sched.schedule()
    assert plan.decode == [s2, s4] and plan.prefill == [(s3, 6)]   # s4's one-token prompt decodes at once


def test_long_prompts_are_fed_in_chunks_beside_decoding_sessions():
    sched = scheduler_of(pool_of(64))
    sched.max_num_batched_tokens = 10
    short, long = waiting_session(1, 4, 4), waiting_session(2, 25, 4)
    sched.add(short)
    sched.add(long)
    plan = sched.schedule()
    assert plan.prefill == [(short, 4), (long, 6)]
    prefilled(short)
    long.num_cached += 6
    plan = sched.schedule()
    assert plan.decode == [short] and plan.prefill == [(long, 10)]
    long.num_cached += 10
    assert sched.schedule().prefill == [(long, 9)]


def test_finish_keeps_the_blocks_its_tokens_use():
    pool = pool_of(8)
    sched = scheduler_of(pool)
    s = waiting_session(1, 5, 20)                     # reserves ceil(25 / 4) = 7 blocks
    sched.add(s)
    sched.schedule()
    assert len(s.block_table) == 7
    s.tokens += [1, 2]                                # the request ended early at 7 tokens
    sched.finish(s)
    assert len(s.block_table) == 2 and pool.num_free == 6 and s.state is SessionState.IDLE
    pool.check_integrity([s.block_table])


def test_a_request_queues_behind_older_sessions_only_unless_fifo():
    """First come first served between programs: an agent back from its tool call (an older
    session) goes ahead of first prompts that arrived since; fifo keeps arrival order."""
    for admission, order in (("program", [1, 2, 3, 4]), ("fifo", [3, 4, 1, 2])):
        sched = scheduler_of(pool_of(4), admission=admission)
        for sid in (3, 4, 1, 2):            # two new agents' first prompts, then two resumed turns
            sched.add(waiting_session(sid, 40, 4))
        assert [s.id for s in sched.waiting] == order


def test_shortest_first_admits_and_feeds_a_continued_turn_ahead_of_long_prompts():
    """A turn that continues its history (few tokens to feed) is admitted while long first prompts
    already fill the step's prompt budget, and is fed first; fifo makes it wait for them."""
    for admission, fed in (("fifo", [(3, 90), (4, 10)]), ("shortest", [(1, 10), (3, 90)])):
        sched = scheduler_of(pool_of(64), admission=admission)
        for sid in (3, 4):                        # two new agents' 90-token first prompts
            sched.add(waiting_session(sid, 90, 4))
        sched.schedule()
        sched.add(waiting_session(1, 10, 4))     # then an agent back from its tool call
        plan = sched.schedule()
        assert [(s.id, n) for s, n in plan.prefill] == fed


def test_program_order_admits_a_request_waiting_past_the_bound_first():
    """Bounded wait: under program order the youngest agent's request, once it has waited past
    max_wait_s, goes ahead of older agents' newer requests."""
    sched = scheduler_of(pool_of(4), admission="program", max_wait_s=0.25)
    young = waiting_session(5, 12, 4)           # 4 blocks: the whole pool
    young.request.queued_at -= 1.0              # queued a second ago
    sched.add(young)
    for sid in (1, 2):
        sched.add(waiting_session(sid, 4, 4))
    assert [s.id for s in sched.waiting] == [1, 2, 5]
    sched.schedule()
    assert [s.id for s in sched.running] == [5] and [s.id for s in sched.waiting] == [1, 2]
