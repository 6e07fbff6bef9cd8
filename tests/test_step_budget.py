"""Step-time budget: while sessions decode, a step feeds only the prompt tokens that fit in
max_step_ms beside the decode (learned from measured step times); with nobody decoding it feeds
max_num_batched_tokens; prompts always progress; the admission orders still order the chunks."""
from test_scheduler import pool_of, prefilled, scheduler_of, waiting_session

from djinnd.engine.step_budget import StepBudget


def simulate(budget: StepBudget, fixed_s: float, token_s: float, decode_s: float, steps: int = 40,
             prefill_s: float | None = None) -> list[int]:
    """Steps beside decoding rows that take decode_s + fixed_s + token_s per prompt token (weights
    read once, a fixed cost, then per token), after a decode step and a prompt on its own (prefill_s
    for 2,048 tokens; token_s each by default) as in the engine. The chunks fed."""
    budget.observe_decode(decode_s)
    budget.observe_prefill(2048, 2048 * token_s if prefill_s is None else prefill_s)
    chunks = []
    for _ in range(steps):
        chunks.append(budget.tokens(True, 2048))
        budget.observe_step(chunks[-1], decode_s + fixed_s + token_s * chunks[-1])
    return chunks


def test_budget_settles_where_prefill_and_decode_fill_the_step():
    budget = StepBudget(max_step_ms=50)
    n = simulate(budget, fixed_s=0.004, token_s=20e-6, decode_s=0.010)[-1]
    assert abs((0.004 + 20e-6 * n + 0.010) - 0.050) < 0.002, n      # the step takes about 50 ms
    assert budget.tokens(False, 2048) == 2048                      # nobody waits on a prompt-only step


def test_budget_never_stops_prompts_and_is_off_at_zero():
    budget = StepBudget(max_step_ms=5)
    assert simulate(budget, fixed_s=0.004, token_s=20e-6, decode_s=0.010)[-1] == budget.min_tokens > 0
    off = StepBudget(max_step_ms=0)
    assert simulate(off, fixed_s=0.004, token_s=20e-6, decode_s=0.010)[-1] == 2048


def test_a_large_fixed_cost_per_step_is_learned_within_a_few_steps():
    """A mixed step costs 20 ms whatever its prompt tokens (eager forward, prefix gathers): a time per
    token (time / tokens) overstates small chunks and creeps down to the chunk over many steps over
    budget; the fitted line finds it after the first steps, and says what it found."""
    budget = StepBudget(max_step_ms=40)
    chunks = simulate(budget, fixed_s=0.020, token_s=50e-6, decode_s=0.0065, steps=20)
    ideal = (0.040 - 0.0065 - 0.020) / 50e-6                     # 270 tokens fill the step
    settled = chunks[3:]
    assert all(abs(n - ideal) <= 0.15 * ideal for n in settled), chunks
    assert all(0.0265 + 50e-6 * n <= 1.1 * 0.040 for n in settled), chunks
    status = budget.status()
    assert abs(status["step_base_ms"] - 26.5) < 1 and abs(status["step_token_ms"] - 0.05) < 0.005, status


def test_chunks_stuck_at_the_floor_grow_back_when_steps_get_cheaper():
    """Alike chunks tell the fixed cost from the per-token one apart no more: the budget tries larger
    ones while steps come in under budget, and settles where the cheaper steps fill the budget."""
    budget = StepBudget(max_step_ms=40)
    assert simulate(budget, fixed_s=0.040, token_s=50e-6, decode_s=0.0065, steps=40)[-1] == 32
    chunks = simulate(budget, fixed_s=0.020, token_s=50e-6, decode_s=0.0065, steps=25)
    assert all(0.0265 + 50e-6 * n <= 1.1 * 0.040 for n in chunks), chunks
    assert abs(chunks[-1] - 270) <= 0.15 * 270, chunks


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
