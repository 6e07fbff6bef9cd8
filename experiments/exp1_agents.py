"""Experiment 1 (agent density) and Experiment 3 (memory pressure) with real agent processes.

    python experiments/exp1_agents.py --quick               # H100, ~7 min: 7B, 8 GiB pool, N = 16, 32, 48
    python experiments/exp1_agents.py --sweep 20,40,60,80   # the seeds' shape: 13B, λ = 0.2/s, tools U(10 s, 20 s)
    python experiments/exp1_agents.py --exp3                # 50 sessions, half paused at breakpoints
    python experiments/exp1_agents.py --profile long --policies semantic   # 8B, 8k->64k contexts (exp1_long.py)
    python experiments/exp1_agents.py --model random:tiny --device cpu --agents 8 --context 96 ...  # on CPU

Experiment 1: N agents arrive as a Poisson process (rate λ); each loops generate -> tool call
(sleep) -> resume for several turns, its context growing every turn. One daemon per policy runs
the whole N sweep, one N after another, with the KV pool capped (`--kv-cache-mb`, else the
largest N's total KV / `--oversubscribe`; printed, with each N's oversubscription). Baselines in
the same run: `resident` (a pool that holds every agent's KV: no paging) and one HF transformers
process per agent (`--hf`, at the smallest N: how many ran out of device memory). Per policy and
N: completed turns/s, TTFT of first and resumed turns as the agents saw it, queue wait, swap bytes
each way, reactive restores, peak live sessions, the memory timeline (PNG, from the daemon's
sampler), and the largest N whose p99 resumed TTFT meets --slo-ms (and 100/200 ms) with nobody
refused. For the pool to matter, agents must be alive at once: pick λ, turns and tool times so
that λ x an agent's lifetime is near N (the `live` column shows it). JSON and PNGs under
experiments/results/, a table last.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import exp1_long, exp1_long_report, exp1_report as report  # noqa: E402
from experiments.exp1_run import run_exp3, run_hf, run_policy, workload  # noqa: E402
from experiments.harness import ROOT, stamp  # noqa: E402

QUICK = {"model": "random:llama-2-7b", "time_scale": 0.1, "rate": 2.0, "turns": 6, "growth": 32,
         "kv_cache_mb": 8192, "sweep": "16,32,48", "policies": "semantic,lru,recompute"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=80, help="N, when there is no --sweep")
    p.add_argument("--sweep", default="", help="N values, comma-separated (the pool is sized for the largest)")
    p.add_argument("--rate", type=float, default=0.2, help="Poisson arrivals per second (λ), before --time-scale")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--tool-dist", choices=("uniform", "lognormal"), default="uniform")
    p.add_argument("--tool-min", type=float, default=10.0, help="uniform: seconds")
    p.add_argument("--tool-max", type=float, default=20.0)
    p.add_argument("--tool-median", type=float, default=12.0, help="lognormal: seconds")
    p.add_argument("--tool-sigma", type=float, default=0.8, help="lognormal: heavy tail")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies tool times and inter-arrival gaps")
    p.add_argument("--context", type=int, default=1024, help="tokens of the first prompt")
    p.add_argument("--growth", type=int, default=64, help="tokens each tool result appends")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per turn")
    p.add_argument("--hints", action=argparse.BooleanOptionalAction, default=True, help="send expected_s")
    p.add_argument("--tool-name", default="tool", help="tool name sent with IO_WAIT ('' for none)")
    p.add_argument("--policies", default="semantic,lru,recompute,none")
    p.add_argument("--resident", action=argparse.BooleanOptionalAction, default=True,
                   help="also run with a pool that holds everything (what a resident session gets)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                   help="one HF transformers process per agent (default: on CUDA)")
    p.add_argument("--kv-cache-mb", type=float, default=0, help="the KV pool; 0: total KV / --oversubscribe")
    p.add_argument("--oversubscribe", type=float, default=3.0)
    p.add_argument("--slo-ms", type=float, default=500.0)
    p.add_argument("--model", default="random:llama-2-13b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--daemon-flags", default="", help="more djinnd flags, e.g. '--prefetch-lead-ms 40'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exp3", action="store_true", help="Experiment 3 instead: sessions paused at breakpoints")
    p.add_argument("--exp3-sessions", type=int, default=50)
    p.add_argument("--exp3-pause-s", type=float, default=2.0, help="held at the breakpoint, then as long idle")
    p.add_argument("--exp3-context", type=int, default=512,
                   help="first prompt of each session (so the unpressured run fits beside 13B weights)")
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK}")
    p.add_argument("--out", default="", help="JSON path (default experiments/results/exp1_<device>_<date>.json)")
    exp1_long.add_args(p)
    a = p.parse_args(argv)
    if a.quick or a.profile == "long":
        p.set_defaults(**(QUICK if a.quick else exp1_long.PROFILE))
        a = p.parse_args(argv)
    return resolve(a)


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    import torch
    a.device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    a.hf = a.device.startswith("cuda") if a.hf is None else a.hf
    a.sizes = [int(n) for n in a.sweep.split(",")] if a.sweep else [a.agents]
    a.policy_list = [x for x in a.policies.split(",") if x]
    if not a.out:
        kind = "exp3" if a.exp3 else "exp1_long" if a.profile == "long" else "exp1"
        a.out = os.path.join(ROOT, "experiments", "results", f"{kind}_{a.device.split(':')[0]}_{stamp()['date'][:10]}.json")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    return exp1_long.resolve(a) if a.profile == "long" else a


def tool_times(a, rng: random.Random) -> list[float]:
    draw = (lambda: rng.uniform(a.tool_min, a.tool_max)) if a.tool_dist == "uniform" else \
        (lambda: rng.lognormvariate(0, a.tool_sigma) * a.tool_median)
    return [draw() * a.time_scale for _ in range(a.turns - 1)]


def jobs(a, n: int, vocab: int) -> list[dict]:
    """The same agents (arrival times, prompts, tool times) for every policy."""
    rng, t, out = random.Random(a.seed), 0.0, []
    for i in range(n):
        t += rng.expovariate(a.rate / a.time_scale)
        out.append({"seed": a.seed * 100003 + i, "arrive_s": t, "context": a.context, "growth": a.growth,
                    "new_tokens": a.new_tokens, "tool_s": tool_times(a, rng), "hints": a.hints,
                    "tool": a.tool_name or None, "vocab": vocab})
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.exp3:
        result = run_exp3(a)
        report.print_exp3(result)
    elif a.profile == "long":
        result = exp1_long.run(a)
        exp1_long_report.print_table(result)
    else:
        result = run_exp1(a)
        report.print_exp1(result)
    save(a, result)
    print(f"\nwrote {a.out}")
    return result


def run_exp1(a) -> dict:
    shape = workload(a, max(a.sizes))
    pool = shape["kv_cache_mb"] * 2**20
    print(f"model {a.model} on {a.device}: {shape['kv_bytes_per_token'] / 2**10:.0f} KiB of KV per token, "
          f"{shape['agent_tokens']} tokens per agent; KV pool capped at {shape['kv_cache_mb']:.1f} MiB; all agents' "
          f"KV is " + ", ".join(f"{n * shape['total_kv_bytes'] / max(a.sizes) / pool:.1f}x the pool at N={n}"
                                for n in a.sizes), flush=True)
    sets = [jobs(a, n, shape["vocab"]) for n in a.sizes]
    result = {**stamp(), "experiment": 1, "args": {k: v for k, v in vars(a).items()}, "workload": shape, "rows": []}
    for policy in a.policy_list + (["resident"] if a.resident else []):
        result["rows"] += run_policy(a, shape, policy, sets)
        save(a, result)                 # a run cut short keeps what it measured
    if a.hf:            # where one process per agent runs out of memory needs one N only
        result["rows"].append(run_hf(a, shape, sets[0]))
    report.compare_tokens(result["rows"])
    return result | {"largest_n_meeting_slo": report.largest_n(result["rows"])}


def save(a, result: dict):
    with open(a.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
