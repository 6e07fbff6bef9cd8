"""Step-time budget: while sessions decode, a step feeds only the prompt tokens that fit in
max_step_ms beside the decode (learned from measured step times); with nobody decoding it feeds
max_num_batched_tokens; prompts always progress; the admission orders still order the chunks."""
from test_scheduler import pool_of, prefilled, scheduler_of, waiting_session

from djinnd.engine.graphs import token_buckets
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
        budget.observe_step([(0, chunks[-1])], decode_s + fixed_s + token_s * chunks[-1])
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
    budget; the fitted cost finds it after the first steps, and says what it found."""
    budget = StepBudget(max_step_ms=40)
    chunks = simulate(budget, fixed_s=0.020, token_s=50e-6, decode_s=0.0065, steps=20)
    ideal = (0.040 - 0.0065 - 0.020) / 50e-6                     # 270 tokens fill the step
    settled = chunks[3:]
    assert all(abs(n - ideal) <= 0.15 * ideal for n in settled), chunks
    assert all(0.0265 + 50e-6 * n <= 1.1 * 0.040 for n in settled), chunks
    status, n = budget.status(), chunks[-1]                      # what it found explains the steps
    assert abs(status["step_base_ms"] + status["step_token_ms"] * n - (26.5 + 0.05 * n)) < 1, status


def test_chunks_stuck_at_the_floor_grow_back_when_steps_get_cheaper():
    """Alike chunks tell the fixed cost from the per-token one apart no more: the budget tries larger
    ones while steps come in under budget, and settles where the cheaper steps fill the budget."""
    budget = StepBudget(max_step_ms=40)
    assert simulate(budget, fixed_s=0.040, token_s=50e-6, decode_s=0.0065, steps=40)[-1] == 32
    chunks = simulate(budget, fixed_s=0.020, token_s=50e-6, decode_s=0.0065, steps=25)
    assert all(0.0265 + 50e-6 * n <= 1.1 * 0.040 for n in chunks), chunks
    assert abs(chunks[-1] - 270) <= 0.15 * 270, chunks


MS = 1e-3
DECODE_S = 6.5 * MS


def attention_step_s(chunks: list[tuple[int, int]]) -> float:
    """A mixed step on a simulated engine: 32 rows decoding (6.5 ms), 3 ms fixed, 0.02 ms per prompt
    token and attention over each chunk's prefix: a 2,048-token chunk after 14k cached tokens takes
    90 ms, one at the start of its prompt 52 ms."""
    return DECODE_S + 3 * MS + sum(0.02 * MS * n + 1.257e-9 * n * (p + n / 2) for p, n in chunks)


def feed(budget: StepBudget, prompts: list[tuple[int, int]], step_s=attention_step_s) -> list[tuple[int, int, float]]:
    """Prompts (first uncached token, end) arriving one after another while sessions decode, after
    a decode step and a 16k prompt on its own, as in bench_mixed.py. Each step feeds what the budget
    allows; its time reaches the budget one step late, as the engine reads the GPU's time of a step
    once the next is launched. (prefix, tokens, seconds) of each step."""
    for p in range(0, 16384, 2048):
        budget.observe_prefill(2048, attention_step_s([(p, 2048)]) - DECODE_S)
    budget.observe_decode(DECODE_S)
    steps, launched = [], None
    for p, end in prompts:
        while p < end:
            n = min(end - p, budget.tokens(True, 2048, [(p, end - p)]))
            steps.append((p, n, step_s([(p, n)])))
            if launched:
                budget.observe_step(*launched)
            launched, p = ([(p, n)], steps[-1][2]), p + n
    return steps


def fewest_steps(prompts: list[tuple[int, int]], max_step_s: float) -> int:
    """Steps of a scheduler that knows the cost: each the largest chunk that fits."""
    count = 0
    for p, end in prompts:
        while p < end:
            n = max(k for k in range(1, end - p + 1, 8) if attention_step_s([(p, k)]) <= max_step_s)
            count, p = count + 1, p + n
    return count


def test_chunks_late_in_a_long_prompt_stay_within_the_step():
    """Attention over a long prompt's cached prefix makes its late chunks dearer than its first: the
    budget shrinks them as the prefix grows (a cost per token fitted to the early chunks overshoots
    late ones), and still fills the step, so prefill loses little of its rate."""
    prompts = [(0, 16384), (0, 16384)]
    steps = feed(StepBudget(max_step_ms=30), prompts)
    assert all(s <= 1.15 * 0.030 for _, _, s in steps), steps
    second = steps[[p for p, _, _ in steps].index(0, 1):]            # the budget has seen a whole prompt
    assert max(n for p, n, _ in second if p > 12000) < min(n for p, n, _ in second if p < 4000), steps
    assert len(steps) <= 1.1 * fewest_steps(prompts, 0.030), (len(steps), fewest_steps(prompts, 0.030))


def test_a_128k_prompt_stays_within_the_step_to_its_end():
    """Over a 128k prompt the chunks shrink step by step and become alike: trying larger ones to tell
    the fixed cost apart must not push a step that already fills the budget over it."""
    steps = feed(StepBudget(max_step_ms=30), [(0, 131072)])
    assert all(s <= 1.15 * 0.030 for _, _, s in steps), max(steps, key=lambda step: step[2])


def test_a_turn_over_a_long_cached_history_gets_chunks_for_its_prefix():
    """Agents continue long histories: after a short new prompt, a turn with 28k tokens cached is fed
    in chunks sized for attention over those 28k tokens from its first step."""
    steps = feed(StepBudget(max_step_ms=30), [(0, 4096), (28000, 32768)])
    assert all(s <= 1.15 * 0.030 for _, _, s in steps), steps
    turn = [s for p, _, s in steps if p >= 28000][:-1]           # its last chunk is what was left
    assert min(turn) >= 0.8 * 0.030, steps                         # it still fills the step


def test_two_prompts_in_one_step_share_its_time_by_their_prefixes():
    budget = StepBudget(max_step_ms=30)
    feed(budget, [(0, 16384)])
    n = budget.tokens(True, 2048, [(0, 200), (28000, 10000)])      # a short prompt ends, a long one goes on
    seconds = attention_step_s([(0, 200), (28000, n - 200)])
    assert n > 200 and 0.85 * 0.030 <= seconds <= 1.15 * 0.030, (n, seconds)


SIZES = token_buckets(2048)


def bucket_step_s(chunks: list[tuple[int, int]]) -> float:
    """A mixed step replayed from a graph: it costs its chunk bucket, padding included."""
    padded = next(k for k in SIZES if k >= sum(n for _, n in chunks))
    return attention_step_s([(chunks[0][0], padded)])


def test_with_graph_buckets_steps_feed_whole_buckets_and_fill_the_step():
    """A budget of 439 tokens would pay for 512 and feed 439: with the graphs' buckets the budget
    feeds the largest bucket that fits, grows bucket by bucket, and stays within the step."""
    prompts = [(0, 16384), (0, 16384)]
    steps = feed(StepBudget(max_step_ms=30, sizes=SIZES), prompts, bucket_step_s)
    assert all(s <= 1.15 * 0.030 for _, _, s in steps), steps
    ends = {16384}
    assert all(n in SIZES or p + n in ends for p, n, _ in steps), steps       # only a prompt's last chunk is short
    fewest = 0
    for p, end in prompts:
        while p < end:
            p, fewest = p + max(k for k in SIZES if bucket_step_s([(p, k)]) <= 0.030 or k == SIZES[0]), fewest + 1
    assert len(steps) <= 1.15 * fewest, (len(steps), fewest)


def scheduler_with_budget(admission: str):
    sched = scheduler_of(pool_of(200), admission=admission)        # max_num_batched_tokens 100
    sched.budget = StepBudget(max_step_ms=30, min_tokens=4)
    sched.budget.observe_prefill(10, 0.005)                      # 0.5 ms per prompt token, twice that until
    sched.budget.observe_decode(0.010)                           # a step is timed: room for 20 tokens
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
