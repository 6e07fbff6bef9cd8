"""Rows and tables for experiments/exp1_agents.py: what each run measured, the SLO, the cliff."""
from collections import Counter

GiB, MiB = 2**30, 2**20
TIGHTER_SLOS_MS = (100, 200)     # printed beside the run's SLO: where the policies part before it


def pct(samples: list[float]) -> dict:
    if not samples:
        return {"count": 0, "p50": None, "p99": None}
    q = sorted(samples)
    pick = lambda p: q[min(len(q) - 1, int(p * len(q)))]  # noqa: E731
    return {"count": len(q), "p50": pick(0.5), "p99": pick(0.99), "max": q[-1]}


def row(policy: str, n: int, started: float, results: list[dict], before, after, timeline: list[dict],
        slo_ms: float) -> dict:
    """What one (policy, N) run measured: the agents' own timings, and the daemon's counters and
    latency samples as they changed during the run (`before`/`after` from exp1_run.observe)."""
    ok = [r for r in results if "turns" in r]
    turns = [t for r in ok for t in r["turns"]]
    wall = max((t["t"] for t in turns), default=started) - started
    resumed = pct([t["ttft_ms"] for r in ok for t in r["turns"][1:]])
    c, lat = changes(before, after)
    out = {"policy": policy, "agents": n, "finished": len(ok), "refused": n - len(ok),
           "errors": dict(Counter(r.get("error", "oom" if r.get("oom") else "") for r in results if "turns" not in r)),
           "turns": len(turns), "wall_s": wall, "turns_per_s": len(turns) / wall if wall > 0 else 0.0,
           "ttft_resumed_ms": resumed, "ttft_first_ms": pct([r["turns"][0]["ttft_ms"] for r in ok]),
           "queue_wait_ms": {k: pct(lat.get("queue_wait", [])).get(k) for k in ("p50", "p99")},
           "swap_bytes_out": c.get("swap_bytes_out", 0), "swap_bytes_in": c.get("swap_bytes_in", 0),
           "swaps_by_cause": {k[6:]: v for k, v in c.items() if k.startswith(("swaps_in_", "swaps_out_"))},
           "reactive_restores": c.get("swaps_in_restore", 0), "prefills_again": len(lat.get("ttft_dropped", [])),
           "ttft_by_path": {k[5:]: {q: v for q, v in pct(s).items() if q in ("count", "p50", "p99")}
                            for k, s in lat.items() if k.startswith("ttft_")},   # daemon-side, by where the KV was
           "kv_pool_bytes": (after or {}).get("memory", {}).get("kv_pool_bytes"),
           "kv_pool_peak_bytes": max((t["kv_pool_used_bytes"] for t in timeline), default=None),
           "sessions_peak": max((t.get("sessions", 0) for t in timeline), default=None),
           "tokens": [[t["tokens"] for t in r["turns"]] if "turns" in r else None for r in results]}
    out["meets_slo"] = out["refused"] == 0 and resumed["count"] > 0 and resumed["p99"] <= slo_ms
    return out


def changes(before, after) -> tuple[dict, dict]:
    """Counter increments and new latency samples between two observations of one daemon."""
    if not after:
        return {}, {}
    c0, l0 = before["counters"], before["latency"]
    counters = {k: v - c0.get(k, 0) for k, v in after["counters"].items() if isinstance(v, (int, float))}
    return counters, {k: v[len(l0.get(k, ())):] for k, v in after["latency"].items()}


def not_run(policy: str, n: int, why: str) -> dict:
    """A row for a daemon that could not start (say, a resident pool larger than the device)."""
    return {"policy": policy, "agents": n, "finished": 0, "refused": n, "errors": {"not started": n},
            "why": why, "turns": 0, "wall_s": 0.0, "turns_per_s": 0.0, "ttft_resumed_ms": pct([]),
            "ttft_first_ms": pct([]), "queue_wait_ms": {"p50": None, "p99": None}, "swap_bytes_out": 0,
            "swap_bytes_in": 0, "swaps_by_cause": {}, "reactive_restores": 0, "prefills_again": 0,
            "ttft_by_path": {}, "tokens": [None] * n, "meets_slo": False}


def compare_tokens(rows: list[dict]):
    """Tokens must not depend on the policy: each daemon row against the resident (or first) one."""
    for n in sorted({r["agents"] for r in rows}):
        same_n = [r for r in rows if r["agents"] == n and r["policy"] != "hf-per-agent"]
        ran = sorted((r for r in same_n if r["finished"]), key=lambda r: r["policy"] != "resident")
        ref = ran[0]["tokens"] if ran else []
        for r in same_n:
            r["tokens_match"] = all(t is None or u is None or t == u for t, u in zip(r["tokens"], ref))


def largest_n(rows: list[dict], slo_ms: float | None = None) -> dict:
    """Per policy, the largest N whose run met the SLO (the run's own, or p99 resumed TTFT <= slo_ms)."""
    meets = (lambda r: r["meets_slo"]) if slo_ms is None else \
        (lambda r: r["refused"] == 0 and r["ttft_resumed_ms"]["count"] > 0 and r["ttft_resumed_ms"]["p99"] <= slo_ms)
    return {p: max([r["agents"] for r in rows if r["policy"] == p and meets(r)], default=0)
            for p in dict.fromkeys(r["policy"] for r in rows)}


def fmt(ms) -> str:
    return "-" if ms is None else f"{ms:.0f}"


def print_exp1(result: dict):
    w = result["workload"]
    print(f"\nExperiment 1: {result['args']['model']} on {result['args']['device']}, KV pool "
          f"{w['kv_cache_mb']:.1f} MiB, {w['agent_tokens']} tokens per agent, hints "
          f"{result['args']['hints']}, SLO p99 resumed TTFT <= {result['args']['slo_ms']:.0f} ms")
    print(f"{'policy':<13} {'N':>4} {'done':>5} {'refus':>5} {'turns/s':>7} {'resumed p50':>11} {'p99':>7} "
          f"{'first p50':>9} {'queue p50':>9} {'p99':>7} {'live':>4} {'out MiB':>8} {'in MiB':>8} {'reactive':>8} "
          f"{'same tok':>8} {'SLO':>4}")
    for r in result["rows"]:
        print(f"{r['policy']:<13} {r['agents']:>4} {r['finished']:>5} {r['refused']:>5} {r['turns_per_s']:>7.2f} "
              f"{fmt(r['ttft_resumed_ms']['p50']):>11} {fmt(r['ttft_resumed_ms']['p99']):>7} "
              f"{fmt(r['ttft_first_ms']['p50']):>9} {fmt(r['queue_wait_ms']['p50']):>9} "
              f"{fmt(r['queue_wait_ms']['p99']):>7} {r.get('sessions_peak') or 0:>4} {r['swap_bytes_out'] / MiB:>8.1f} {r['swap_bytes_in'] / MiB:>8.1f} "
              f"{r['reactive_restores'] + r['prefills_again']:>8} {str(r.get('tokens_match', '-')):>8} "
              f"{'yes' if r['meets_slo'] else 'no':>4}")
    for r in result["rows"]:
        if r["policy"] == "hf-per-agent":
            print(f"HF transformers, one process per agent, N={r['agents']}: {r['finished']} ran, "
                  f"{r['errors'].get('oom', 0)} out of device memory")
    for slo in TIGHTER_SLOS_MS:
        print(f"largest N with p99 resumed TTFT <= {slo} ms: "
              + ", ".join(f"{p} {n}" for p, n in largest_n(result["rows"], slo).items()))
    print("largest N meeting the SLO: " + ", ".join(f"{p} {n}" for p, n in result["largest_n_meeting_slo"].items()))


def exp3_row(label: str, results: list[dict], status: dict, timeline: list[dict], paused: list) -> dict:
    mem, pool_used = status["memory"], [s["kv_pool_used_bytes"] for s in timeline]
    fractions = [p / n for p, n in paused if n]
    return {"label": label, "finished": sum("tokens" in r for r in results),
            "errors": [r for r in results if "tokens" not in r][:5],
            "kv_pool_bytes": mem["kv_pool_bytes"], "weights_bytes": mem["weights_bytes"],
            "kv_pool_peak_bytes": max(pool_used, default=0),
            "samples_at_budget": sum(u >= 0.9 * mem["kv_pool_bytes"] for u in pool_used),
            "host_arena_peak_bytes": max((s["host_arena_used_bytes"] for s in timeline), default=0),
            "device_allocated_peak_bytes": max((s.get("device_allocated_bytes", 0) for s in timeline), default=0),
            "paused_fraction_mean": sum(fractions) / len(fractions) if fractions else 0.0,
            "paused_max": max((p for p, _ in paused), default=0),
            "swaps_out": status["counters"].get("swaps_out", 0), "swaps_in": status["counters"].get("swaps_in", 0),
            "tokens": [r.get("tokens") for r in results]}


def print_exp3(result: dict):
    w, n, p = result["workload"], result["sessions"], result["pressured"]
    print(f"\nExperiment 3: {n} sessions of {w['agent_tokens']} tokens, {result['args']['model']} on "
          f"{result['args']['device']}; budget weights + KV pool = {(p['weights_bytes'] + p['kv_pool_bytes']) / MiB:,.1f} "
          f"MiB < weights + all KV = {(p['weights_bytes'] + w['total_kv_bytes']) / MiB:,.1f} MiB")
    print(f"{'run':<12} {'done':>5} {'pool MiB':>10} {'peak KV MiB':>11} {'at budget':>9} {'host peak MiB':>13} "
          f"{'device peak MiB':>15} {'paused mean':>11} {'max':>4} {'swaps out/in':>12}")
    for r in (result["pressured"], result["unpressured"]):
        print(f"{r['label']:<12} {r['finished']:>5} {r['kv_pool_bytes'] / MiB:>10,.1f} {r['kv_pool_peak_bytes'] / MiB:>11,.1f} "
              f"{r['samples_at_budget']:>9} {r['host_arena_peak_bytes'] / MiB:>13,.1f} "
              f"{r['device_allocated_peak_bytes'] / MiB:>15,.1f} {r['paused_fraction_mean']:>11.2f} {r['paused_max']:>4} "
              f"{r['swaps_out']:>6}/{r['swaps_in']:<5}")
    print(f"sessions whose tokens equal the unpressured run: {result['sessions_with_equal_tokens']}/{n}")
