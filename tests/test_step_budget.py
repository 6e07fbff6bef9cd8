"""Step-time budget: while sessions decode, a step feeds only the prompt tokens that fit in
max_step_ms beside the decode (learned from measured step times); with nobody decoding it feeds
max_num_batched_tokens; prompts always progress; the admission orders still order the chunks."""
from test_scheduler import pool_of, prefilled, scheduler_of, waiting_session

from djinnd.engine.step_budget import StepBudget


def simulate(budget: StepBudget, fixed_s: float, token_s: float, decode_s: float, steps: int = 40) -> int:
    """Steps whose prefill costs fixed_s + token_s per token (weights read once, then per token)."""
    n = 0
    for _ in range(steps):
        n = budget.tokens(True, 2048)
        budget.observe_prefill(n, fixed_s + token_s * n)
        budget.observe_decode(decode_s)
    return n


def test_budget_settles_where_prefill_and_decode_fill_the_step():
    budget = StepBudget(max_step_ms=50)
    n = simulate(budget, fixed_s=0.004, token_s=20e-6, decode_s=0.010)
    assert abs((0.004 + 20e-6 * n + 0.010) - 0.050) < 0.002, n      # the step takes about 50 ms
    assert budget.tokens(False, 2048) == 2048                      # nobody waits on a prompt-only step


def test_budget_never_stops_prompts_and_is_off_at_zero():
    budget = StepBudget(max_step_ms=5)
    assert simulate(budget, fixed_s=0.004, token_s=20e-6, decode_s=0.010) == budget.min_tokens > 0
    off = StepBudget(max_step_ms=0)
    assert simulate(off, fixed_s=0.004, token_s=20e-6, decode_s=0.010) == 2048


def scheduler_with_budget(admission: str):
    sched = scheduler_of(pool_of(200), admission=admission)        # max_num_batched_tokens 100
    sched.budget = StepBudget(max_step_ms=30, min_tokens=4)
    sched.budget.observe_prefill(10, 0.010)                      # 1 ms per prompt token
    sched.budget.observe_decode(0.010)                           # room for 20 tokens beside the decode
    return sched


def test_scheduler_feeds_the_budget_beside_decoding_sessions_and_all_without():
    sched = scheduler_with_budget("fifo")
    decoding, long_prompt = waiting_session(1, 8, 50), waiting_session(2, 300, 4)
    sched.add(decoding)
    sched.schedule()
    prefilled(decoding)
    sched.add(long_prompt)
    plan = sched.schedule()
    assert plan.decode == [decoding] and plan.prefill == [(long_prompt, 20)]
    sched.finish(decoding)
    assert sched.schedule().prefill == [(long_prompt, 100)]     # nobody decodes: the whole token budget


def test_shortest_admission_still_feeds_the_short_prompt_first_within_the_budget():
    sched = scheduler_with_budget("shortest")
    decoding = waiting_session(1, 8, 50)
    sched.add(decoding)
    sched.schedule()
    prefilled(decoding)
    long_prompt, short_prompt = waiting_session(2, 60, 4), waiting_session(3, 12, 4)
    sched.add(long_prompt)
    sched.add(short_prompt)
    plan = sched.schedule()
    assert plan.decode == [decoding] and plan.prefill == [(short_prompt, 12), (long_prompt, 8)]


def run_mixed(max_step_ms: float):
    """Three sessions decoding while a 600-token prompt arrives; tokens of all, and prefill steps."""
    from conftest import random_prompts
    from djinnd.config import load_config
    from djinnd.daemon import build_engine
    from djinnd.engine.local import LocalClient
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "dtype": "float32",
                                             "kv_cache_mb": 16.0, "max_step_ms": max_step_ms}))
    engine.start()
    client = LocalClient(engine)
    short, long = random_prompts(512, [5, 9, 7], seed=3), random_prompts(512, [600], seed=4)[0]
    pending = [client.submit(client.open(), p, 120) for p in short]
    pending[0].get(timeout=60)                                  # decoding has started
    pending.append(client.submit(client.open(), long, 8))
    outs = [client.done(e)[0].tokens for e in pending]
    engine.stop()
    engine.join()
    return outs, engine.metrics.counters.get("prefill_steps", 0)


def test_a_long_prompt_beside_decoding_sessions_goes_in_small_chunks_and_gives_the_same_tokens():
    plain, plain_steps = run_mixed(0)
    budgeted, budgeted_steps = run_mixed(0.001)                 # always the floor: 32-token chunks
    assert budgeted == plain
    assert budgeted_steps >= plain_steps + 600 // 32 - 2
