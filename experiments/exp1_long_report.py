"""Rows and tables for the long-context profile (experiments/exp1_long.py): what each (policy, N) run
measured, the SLOs, and which resource ran out, read from that run's counters."""
from experiments.exp1_report import changes, fmt, pct

GiB = 2**30
FULL = 0.9          # a resource busy or filled this much of the run counts as run out


def row(policy: str, n: int, started: float, results: list[dict], before, after, timeline: list[dict],
        steady: float) -> dict:
    """steady: when the last agent started; resumed TTFT (the SLO's) counts turns from then on, so
    the burst of first prompts at the start is not counted against it (all turns: _all)."""
    turns = [t for r in results for t in r.get("turns", [])]
    ok = [t for t in turns if "error" not in t]
    wall = max((t["t"] + t["turn_ms"] / 1e3 for t in ok), default=started) - started
    c, lat = changes(before, after)
    swap_s = {d: sum(after["swap_ms"][d][len(before["swap_ms"][d]):]) / 1e3 for d in ("out", "in")}
    recompute_s = c.get("prefill_s", 0) * c.get("recomputed_tokens", 0) / max(1, c.get("prompt_tokens", 0))
    out = {"policy": policy, "agents": n, "wall_s": wall, "turns": len(ok),
           "refused": len(turns) - len(ok), "refusals": sorted({t["message"] for t in turns if "error" in t})[:3],
           "agents_crashed": sum("turns" not in r for r in results), "agents_cut": sum(bool(r.get("cut")) for r in results),
           "turns_per_s": len(ok) / wall if wall > 0 else 0.0,
           "tokens_per_s": sum(t["n"] for t in ok) / wall if wall > 0 else 0.0,
           "prompt_tokens_per_s": c.get("prompt_tokens", 0) / wall if wall > 0 else 0.0,
           "ttft_resumed_ms": pct([t["ttft_ms"] for t in ok if t["turn"] > 0 and t["t"] >= steady]),
           "ttft_resumed_all_ms": pct([t["ttft_ms"] for t in ok if t["turn"] > 0]),
           "ttft_first_ms": pct([t["ttft_ms"] for t in ok if t["turn"] == 0]),
           "queue_wait_ms": pct(lat.get("queue_wait", [])),
           "context_max": max((t["context"] for t in ok), default=0),
           "context_resumed_mean": _mean([t["context"] for t in ok if t["turn"] > 0]),
           "gib_out": c.get("swap_bytes_out", 0) / GiB, "gib_in": c.get("swap_bytes_in", 0) / GiB,
           "swaps_by_cause": {k[6:]: v for k, v in c.items() if k.startswith(("swaps_in_", "swaps_out_"))},
           "kv_drops_device": c.get("kv_drops_device", 0), "kv_drops_host": c.get("kv_drops_host", 0),
           "recomputed_tokens": c.get("recomputed_tokens", 0), "recompute_gpu_s": recompute_s,
           "reprefill_tokens": c.get("kv_reprefill_tokens", 0), "reprefill_gpu_s": c.get("kv_reprefill_s", 0),
           "ttft_by_path": {k[5:]: {q: v for q, v in pct(s).items() if q in ("count", "p50", "p99")}
                            for k, s in lat.items() if k.startswith("ttft_")},
           "kv_pool_bytes": after["memory"]["kv_pool_bytes"], "host_arena_bytes": after["memory"]["host_arena_bytes"],
           "tokens": [{f"{t['session']}.{t['turn']}": t["tokens"] for t in r.get("turns", []) if "tokens" in t}
                      for r in results]}
    mem = after["memory"]
    per_token = mem["kv_pool_bytes"] / max(1, mem["kv_blocks_total"]) / mem["kv_block_tokens"]
    at_end = sum(r["turns"][-1]["context"] + r["turns"][-1]["n"] for r in results if r.get("turns"))
    out["kv_at_end_x_pool"] = at_end * per_token / max(1, mem["kv_pool_bytes"])   # the contexts reached, vs the pool
    out["use"] = usage(out, c, swap_s, timeline, wall)
    out["prefix_cache"] = after.get("prefix")       # hits since the daemon started (sharing: --shared-prompt)
    return out


def usage(r: dict, c: dict, swap_s: dict, timeline: list[dict], wall: float) -> dict:
    """How much of each resource the run used, 0..1: the share of samples with the pool 85% full (the
    semantic policy keeps 10% free in the background), the arena's peak, the copy engines' and the
    engine's busy time, and queueing's share of the p99."""
    pool, arena = r["kv_pool_bytes"], r["host_arena_bytes"]
    wall = max(wall, 1e-9)
    return {"device blocks": sum(t["kv_pool_used_bytes"] >= 0.85 * pool for t in timeline) / max(1, len(timeline)),
            "host arena": max((t["host_arena_used_bytes"] for t in timeline), default=0) / max(1, arena),
            "PCIe": max(swap_s.values()) / wall,
            "GPU": (c.get("prefill_s", 0) + c.get("decode_s", 0) + r["reprefill_gpu_s"]) / wall,
            "GPU recompute": (r["recompute_gpu_s"] + r["reprefill_gpu_s"]) / wall,     # on return or ahead of it
            "queueing": (r["queue_wait_ms"].get("p99") or 0) / max(1e-9, r["ttft_resumed_ms"].get("p99") or 0)}


def exhausted(r: dict) -> str:
    """The resources that ran out in this run, by its own counters."""
    if "why" in r:
        return f"not run ({r['why']})"
    use = r.get("use") or {}
    full = [f"{k} {v:.0%}" for k, v in use.items() if k not in ("queueing", "GPU recompute") and v >= FULL]
    if r.get("kv_drops_device") or r.get("kv_drops_host"):
        full.append(f"drops {r['kv_drops_device'] + r['kv_drops_host']:.0f} "
                    f"(recompute {use.get('GPU recompute', 0):.0%} of the run)")
    if use.get("queueing", 0) >= 0.5:
        full.append(f"queueing {use['queueing']:.0%} of p99 TTFT")
    if full:
        return ", ".join(full)
    busiest = max(((k, v) for k, v in use.items() if k not in ("queueing", "GPU recompute")),
                  key=lambda kv: kv[1], default=("nothing", 0.0))
    return f"nothing at its limit (busiest: {busiest[0]} {busiest[1]:.0%})"


def size(nbytes: float) -> str:
    """Bytes the way a person reads them: 1.5G, 340M, 12K."""
    for unit, scale in (("G", GiB), ("M", 2**20), ("K", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return f"{nbytes:.0f}B"


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def not_run(policy: str, n: int, why: str) -> dict:
    return {"policy": policy, "agents": n, "why": why, "turns": 0, "refused": 0, "agents_crashed": n,
            "ttft_resumed_ms": pct([]), "tokens": []}


def meets(r: dict, slo_ms: float) -> bool:
    p99 = r["ttft_resumed_ms"].get("p99")
    return r["refused"] == 0 and not r["agents_crashed"] and p99 is not None and p99 <= slo_ms


def largest_n(rows: list[dict], slo_ms: float) -> dict:
    return {p: max([r["agents"] for r in rows if r["policy"] == p and meets(r, slo_ms)], default=0)
            for p in dict.fromkeys(r["policy"] for r in rows)}


def ran_out(rows: list[dict], slo_ms: float) -> dict:
    """Per policy: at its largest N meeting slo_ms, and at the next N (where it broke), what ran out."""
    out = {}
    for p, n in largest_n(rows, slo_ms).items():
        mine = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["agents"])
        at = next((r for r in mine if r["agents"] == n), None)
        beyond = next((r for r in mine if r["agents"] > n), None)
        out[p] = {"largest_n": n, "at": at and exhausted(at), "next_n": beyond and beyond["agents"],
                  "beyond": beyond and exhausted(beyond)}
    return out


def compare_tokens(rows: list[dict]):
    """Turns that every policy ran must have the same tokens (exact in fp32; bf16 batches differ):
    each row against the first policy's row of its N (a run of one policy compares nothing)."""
    for n in sorted({r["agents"] for r in rows}):
        same_n = [r for r in rows if r["agents"] == n and r["tokens"]]
        for r in same_n[1:]:
            pairs = [(a.get(k), b[k]) for a, b in zip(r["tokens"], same_n[0]["tokens"]) for k in b if k in a]
            r["turns_compared"], r["turns_equal"] = len(pairs), sum(x == y for x, y in pairs)


def line(r: dict) -> str:
    if "why" in r:
        return f"{r['policy']:<10} {r['agents']:>4}  not run: {r['why']}"
    t, f, q, u = r["ttft_resumed_ms"], r["ttft_first_ms"], r["queue_wait_ms"], r["use"]
    return (f"{r['policy']:<10} {r['agents']:>4} {r['turns']:>5} {r['refused']:>4} {r['turns_per_s']:>6.2f} "
            f"{r['tokens_per_s']:>7.0f} {fmt(t['p50']):>6} {fmt(t['p99']):>6} {fmt(t.get('max')):>6} "
            f"{fmt(f['p50']):>6} {fmt(q.get('max')):>7} {r['context_max']:>6} {r['kv_at_end_x_pool']:>5.1f} "
            f"{size(r['gib_out'] * GiB):>6} "
            f"{size(r['gib_in'] * GiB):>6} {r['recompute_gpu_s']:>6.1f} {r['kv_drops_device'] + r['kv_drops_host']:>5.0f} "
            f"{u['device blocks']:>5.0%} {u['host arena']:>5.0%} {u['PCIe']:>5.0%} {u['GPU']:>5.0%}")


HEADER = (f"{'policy':<10} {'N':>4} {'turns':>5} {'ref':>4} {'turn/s':>6} {'tok/s':>7} {'res50':>6} {'res99':>6} "
          f"{'resmax':>6} {'1st50':>6} {'q max':>7} {'ctx':>6} {'xpool':>5} {'out':>6} {'in':>6} {'recS':>6} {'drops':>5} "
          f"{'pool':>5} {'arena':>5} {'PCIe':>5} {'GPU':>5}")


def print_table(result: dict):
    a, m = result["args"], result["memory"]
    print(f"\nExperiment 1, long profile: {a['model']} {a['dtype']} on {result.get('gpu') or a['device']}, "
          f"{result['date'][:10]}, commit {result['git']}; pool {size(m['kv_pool_bytes'])}, arena "
          f"{size(m['host_arena_bytes'])}; {a['arrivals']} arrivals, {a['duration_s']:.0f} s per N, "
          f"time scale {a['time_scale']}")
    print("TTFT and queue in ms; ctx: longest context; xpool: the agents' KV at the end over the pool;\n"
          "out/in: KV copied to/from the host; recS: GPU seconds recomputing dropped KV; pool: share of\n"
          "samples with the pool 85% full; arena: its peak; PCIe, GPU: busy share")
    print(HEADER)
    for r in result["rows"]:
        print(line(r) + (f"  tokens {r['turns_equal']}/{r['turns_compared']}" if "turns_compared" in r else ""))
    for slo, by_policy in result["largest_n"].items():
        print(f"largest N with p99 resumed TTFT <= {float(slo):.0f} ms: "
              + ", ".join(f"{p} {n}" for p, n in by_policy.items()))
    for p, o in result["ran_out"].items():
        print(f"{p}: at N={o['largest_n']} ran out: {o['at'] or '-'}"
              + (f"; at N={o['next_n']}: {o['beyond']}" if o["next_n"] else ""))
