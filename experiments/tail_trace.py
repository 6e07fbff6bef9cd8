"""Where a benchmark's TPOT tail comes from: the longest token gaps, the slowest engine steps with
what they ran, and the garbage collections in a window (bench_mixed.py). A gap no step explains
was made between steps."""
import gc
import time


def worst_gaps(times: list[list[float]], start: float, end: float, count: int = 12) -> list[list[float]]:
    """The longest gaps in the window, once per step (sessions share steps): [ms, ms since start, sessions]."""
    by_end: dict[float, list[float]] = {}
    for t in times:
        for a, b in zip(t, t[1:]):
            if start <= b <= end:
                by_end.setdefault(round(b, 4), []).append(1e3 * (b - a))
    worst = sorted(by_end.items(), key=lambda kv: -max(kv[1]))[:count]
    return [[round(max(g), 2), round(1e3 * (b - start), 1), len(g)] for b, g in worst]


def trace_steps(engine) -> list[tuple]:
    """Every engine step's host time, with what it ran: (start, ms, decode rows, [(prefix, tokens)]).
    The host waits in a step for the tokens of the one before, so a long step is a long step on the
    GPU, or host work in it."""
    steps, schedule, step = [], engine.scheduler.schedule, engine.step
    plan = [None]

    def scheduled():
        plan[0] = schedule()
        return plan[0]

    def timed():
        plan[0], started = None, time.perf_counter()
        step()
        p = plan[0]
        steps.append((started, 1e3 * (time.perf_counter() - started), len(p.decode) if p else 0,
                      [(s.num_cached - n, n) for s, n in p.prefill] if p else []))
    engine.scheduler.schedule, engine.step = scheduled, timed
    return steps


def slowest_steps(steps: list[tuple], start: float, end: float, count: int = 12) -> list[list]:
    """[ms since start, ms, decode rows, chunks] of the longest steps in the window, and of the steps
    on either side of them."""
    inside = [i for i, s in enumerate(steps) if start <= s[0] <= end]
    worst = sorted(inside, key=lambda i: -steps[i][1])[:count]
    near = sorted({j for i in worst for j in (i - 1, i, i + 1) if 0 <= j < len(steps)})
    return [[round(1e3 * (steps[j][0] - start), 1), round(steps[j][1], 2), steps[j][2], steps[j][3],
             "slow" if j in worst else ""] for j in near]


def watch_gc() -> list[tuple[float, int, float]]:
    """Every garbage collection from now on: (start, generation, ms)."""
    seen, started = [], [0.0]

    def callback(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            seen.append((started[0], info["generation"], 1e3 * (time.perf_counter() - started[0])))
    gc.callbacks.append(callback)
    return seen


def full_collections(seen: list[tuple], start: float, end: float) -> list[list[float]]:
    """[ms since start, ms] of each collection of the oldest generation in the window."""
    return [[round(1e3 * (t - start), 1), round(ms, 2)] for t, g, ms in seen if g == 2 and start <= t <= end]
