"""Experiment 1, long-context profile (`exp1_agents.py --profile long`): agents whose contexts grow
from an 8k-token first prompt to 32k-64k, on a pool that is the device memory left after weights
and a host arena that is a large share of host RAM, as on a real machine.

    python experiments/exp1_agents.py --profile long --policies semantic --out ...json    # one GPU command per policy
    python experiments/exp1_agents.py --profile long --model random:tiny --device cpu --context 128 \\
        --growth-min 16 --growth-max 64 --new-tokens 8 --max-context 640 --sweep 2,4 --duration 20

Each agent process (exp1_long_agent.py) turns: generate ~200 tokens -> tool call (lognormal, median
4 s, capped; x --time-scale) -> a tool result of 1k-4k tokens appended; a full context starts a new
conversation. Closed loop (`--arrivals closed`: N agents active all along, starts staggered) for
--duration seconds per N, or Poisson arrivals of N agents at --rate, one conversation each. One
daemon per policy runs the sweep, so a policy's sweep is one command that fits --budget-s.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import libdjinn
from experiments import exp1_long_report as report
from experiments.exp1_run import HERE, parse
from experiments.harness import ROOT, device_info, host_memory, start_daemon, stop_daemon
from libdjinn import plots

GiB, MiB = 2**30, 2**20
STARTUP_S = 75          # daemon start on the GPU (weights, pool, graphs) within --budget-s
# Why N = 16..64 and time scale 0.5 on an H200: the pool left after 8B weights holds ~850k tokens,
# so 16 agents at ~35k tokens fit and 64 are ~2.5x over the pool and past pool + arena (drops);
# at scale 0.5 a turn (200 tokens, ~5 s) and a tool call (mean ~3.3 s) alternate, so agents grow
# to ~35-45k tokens in a ~95 s window while ~40% of them are in a tool call at any time.
GRACE_S = 20            # after the deadline: last turns finish, then agents are stopped
PROFILE = {"model": "random:llama-3.1-8b", "dtype": "bfloat16", "context": 8192, "new_tokens": 200,
           "tool_dist": "lognormal", "tool_median": 4.0, "tool_sigma": 1.0, "sweep": "16,32,48,64", "time_scale": 0.5,
           "policies": "semantic,lru,recompute", "resident": False, "hf": False, "turns": 0}


def add_args(p):
    g = p.add_argument_group("long profile (--profile long)")
    g.add_argument("--profile", choices=("short", "long"), default="short", help=f"long: {PROFILE}")
    g.add_argument("--arrivals", choices=("closed", "poisson"), default="closed",
                   help="poisson: N agents at --rate (so N / rate x time scale should fit --duration)")
    g.add_argument("--duration", type=float, default=0, help="seconds per N (0: the sweep fits --budget-s)")
    g.add_argument("--budget-s", type=float, default=540, help="one policy's whole sweep, start-up included")
    g.add_argument("--stagger-s", type=float, default=0.5,
                   help="closed loop: agent i starts i x this many seconds in (at most a third of --duration)")
    g.add_argument("--growth-min", type=int, default=1024, help="tokens of a tool result, at least")
    g.add_argument("--growth-max", type=int, default=4096)
    g.add_argument("--max-context", type=int, default=65536, help="a conversation ends before passing this")
    g.add_argument("--tool-cap", type=float, default=30.0, help="seconds: the lognormal tail is cut here")
    g.add_argument("--host-arena-mb", type=float, default=0,
                   help="0: half the host RAM (at most 80%% of /dev/shm free) on CUDA, half the pool on CPU")
    g.add_argument("--headroom-mb", type=float, default=0, help="device memory kept from the pool (0: 6%% + 2 GiB)")
    g.add_argument("--slos", default="250,500,1000", help="p99 resumed TTFT targets, ms")
    g.add_argument("--keep-tokens", action="store_true", help="agents return their tokens, not hashes")
    g.add_argument("--shared-prompt", type=int, default=0,
                   help="tokens of a system prompt every conversation starts with, the same for all agents "
                        "(part of --context); compare --daemon-flags '--prefix-sharing off'")


def resolve(a):
    a.slo_list = [float(x) for x in a.slos.split(",")]
    a.duration_s = a.duration or max(10.0, (a.budget_s - STARTUP_S) / len(a.sizes) - GRACE_S)
    return a


def memory_plan(a) -> dict:
    """The pool and arena the daemon gets, and the workload's KV against them."""
    from djinnd.model.loader import model_args
    args = model_args(a.model)
    elem = 4 if a.dtype == "float32" or (a.dtype == "auto" and not a.device.startswith("cuda")) else 2
    per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * elem
    gpu = device_info() if a.device.startswith("cuda") else None
    worst = max(a.sizes) * a.max_context * per_token
    if a.kv_cache_mb:
        pool = a.kv_cache_mb * MiB
    elif gpu:
        headroom = a.headroom_mb * MiB or 0.06 * gpu["total"] + 2 * GiB
        pool = gpu["free"] - weights_bytes(args, elem) - headroom
    else:
        pool = max(worst / a.oversubscribe, 2.2 * a.max_context * per_token)     # two full agents at least
    host = host_memory()
    arena = a.host_arena_mb * MiB or (min(0.5 * host["ram_total"], 0.8 * host["shm_free"]) if gpu else 0.5 * pool)
    return {"kv_bytes_per_token": per_token, "kv_pool_bytes": int(pool), "host_arena_bytes": int(arena),
            "weights_bytes": weights_bytes(args, elem), "gpu": gpu, "host": host, "vocab": args.vocab_size,
            "pool_auto": not a.kv_cache_mb and gpu is not None}


def weights_bytes(args, elem: int) -> int:
    from djinnd.model.llama import LlamaForCausalLM
    import torch
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    return sum(p.numel() for p in model.parameters()) * elem


def print_plan(a, m: dict):
    per_agent, size = a.max_context * m["kv_bytes_per_token"], report.size
    print(f"model {a.model} {a.dtype} on {a.device}{' (' + m['gpu']['name'] + ')' if m['gpu'] else ''}: "
          f"{size(m['kv_bytes_per_token'])} of KV per token; weights {size(m['weights_bytes'])}; "
          f"KV pool {size(m['kv_pool_bytes'])}{' (device memory left after weights)' if m['pool_auto'] else ''}; "
          f"host arena {size(m['host_arena_bytes'])} (host RAM {size(m['host']['ram_total'])})", flush=True)
    for n in a.sizes:
        kv = n * per_agent
        print(f"  N={n}: at most {size(kv)} of KV (every agent at {a.max_context} tokens) = "
              f"{kv / m['kv_pool_bytes']:.1f}x the pool, {kv / (m['kv_pool_bytes'] + m['host_arena_bytes']):.1f}x "
              f"pool + arena", flush=True)
    print(f"  {a.arrivals} arrivals, {a.duration_s:.0f} s per N, tools lognormal median {a.tool_median} s "
          f"(sigma {a.tool_sigma}, cap {a.tool_cap} s) x time scale {a.time_scale}", flush=True)


def jobs(a, n: int, vocab: int) -> list[dict]:
    """The same agents for every policy; arrive_s: when each starts after the run's start."""
    rng, t, out = random.Random(a.seed), 0.0, []
    for i in range(n):
        closed = a.arrivals == "closed"
        t = i * min(a.stagger_s, a.duration_s / 3 / n) if closed else t + rng.expovariate(a.rate / a.time_scale)
        out.append({"seed": a.seed * 100003 + i, "arrive_s": t, "vocab": vocab, "context": a.context,
                    "new_tokens": a.new_tokens, "growth": [a.growth_min, a.growth_max], "max_context": a.max_context,
                    "tool_median_s": a.tool_median, "tool_sigma": a.tool_sigma, "tool_cap_s": a.tool_cap,
                    "time_scale": a.time_scale, "hints": a.hints, "tool": a.tool_name or None,
                    "max_turns": a.turns, "sessions": 0 if a.arrivals == "closed" else 1,
                    "keep_tokens": a.keep_tokens, "shared_prompt": [a.seed, min(a.shared_prompt, a.context)]})
    return out


def daemon_flags(a, m: dict, policy: str, pool_bytes: float) -> list[str]:
    period = max(50.0, 1e3 * len(a.sizes) * (a.duration_s + GRACE_S) / 3000)    # the daemon keeps 4,096 samples
    seqs = ["--max-num-seqs", str(max(a.sizes))] if max(a.sizes) > 64 else []
    return ["--model", a.model, "--device", a.device, "--dtype", a.dtype, "--policy", policy,
            "--kv-cache-mb", f"{pool_bytes / MiB:.3f}", "--host-arena-mb", f"{m['host_arena_bytes'] / MiB:.3f}",
            "--timeline-period-ms", f"{period:.0f}", *seqs, *a.daemon_flags.split()]


def start(a, m: dict, policy: str):
    """The daemon; an automatic pool that does not fit after all is retried 15% smaller, twice."""
    pool = m["kv_pool_bytes"]
    for attempt in range(3 if m["pool_auto"] else 1):
        try:
            return (*start_daemon(*daemon_flags(a, m, policy, pool)), pool)
        except RuntimeError:
            if attempt == 2 or not m["pool_auto"]:
                raise
            pool *= 0.85
            print(f"djinnd did not start; retrying with a {pool / GiB:.1f} GiB pool", flush=True)


def run_policy(a, m: dict, policy: str, agent_sets: list[list[dict]], saved=lambda rows: None) -> list[dict]:
    """One daemon, the sweep's N one after another; an N that would outrun --budget-s is skipped."""
    began = time.time()
    try:
        daemon, sock, pool = start(a, m, policy)
    except RuntimeError as e:
        return [report.not_run(policy, len(agents), str(e)) for agents in agent_sets]
    rows, deadline = [], began + a.budget_s
    try:
        with libdjinn.connect(sock) as djinn:
            for agents in agent_sets:
                if time.time() + a.duration_s + GRACE_S > deadline:
                    rows.append(report.not_run(policy, len(agents), f"--budget-s {a.budget_s:.0f} spent"))
                    continue
                try:
                    rows.append(run_n(a, djinn, sock, policy, agents) | {"kv_pool_bytes_asked": pool})
                except (OSError, libdjinn.DjinnError) as e:     # the daemon died: say so, keep the rest
                    rows.append(report.not_run(policy, len(agents), f"{type(e).__name__}: {e}"))
                    break
                finally:
                    saved(rows)         # a command cut short keeps what it measured
                print(report.line(rows[-1]), flush=True)
    finally:
        stop_daemon(daemon)
    return rows


def run_n(a, djinn, sock: str, policy: str, agents: list[dict]) -> dict:
    before, started = observe(djinn), time.time()
    results = spawn(sock, agents, started, started + a.duration_s)
    after = observe(djinn)
    timeline = [t for t in after["timeline"] if t["t"] >= started]
    png = f"{os.path.splitext(a.out)[0]}_{policy}_n{len(agents)}.png"
    plots.plot_timeline(timeline, png, title=f"long profile, policy {policy}, {len(agents)} agents")
    steady = started + (max(job["arrive_s"] for job in agents) if a.arrivals == "closed" else 0)
    return report.row(policy, len(agents), started, results, before, after, timeline, steady) | {"timeline_png": png}


def observe(djinn) -> dict:
    status, swaps = djinn.status(), djinn.request("swaps")
    return {"counters": status["counters"], "memory": status["memory"], "prefix": status.get("prefix_cache"),
            "latency": swaps["latency_samples_ms"],
            "swap_ms": swaps["all_ms"], "timeline": djinn.request("timeline")["timeline"]}


def spawn(sock: str, agents: list[dict], t0: float, until: float) -> list[dict]:
    """Start each agent at its time; past the deadline and a grace, stop those still running
    (they report the turns they finished)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))}
    procs = []
    for job in agents:
        time.sleep(max(0.0, t0 + job["arrive_s"] - time.time()))
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "exp1_long_agent.py"), sock,
                                       json.dumps(job | {"until": until})], stdout=subprocess.PIPE, text=True,
                                      cwd=ROOT, env=env))
    hard_stop = until + GRACE_S
    while any(p.poll() is None for p in procs) and time.time() < hard_stop:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    out = []
    for p in procs:
        try:
            out.append(parse(p.communicate(timeout=30)[0]))
        except subprocess.TimeoutExpired:
            p.kill()
            out.append(parse(p.communicate()[0]))
    return out


def run(a) -> dict:
    from experiments.harness import stamp
    m = memory_plan(a)
    print_plan(a, m)
    sets = [jobs(a, n, m["vocab"]) for n in a.sizes]
    result = {**stamp(), "experiment": "1-long", "args": dict(vars(a)), "memory": m, "rows": []}
    for policy in a.policy_list:
        done = list(result["rows"])
        result["rows"] = done + run_policy(a, m, policy, sets, lambda rows: save(a, result | {"rows": done + rows}))
        save(a, result)
    report.compare_tokens(result["rows"])
    result["largest_n"] = {str(slo): report.largest_n(result["rows"], slo) for slo in a.slo_list}
    result["ran_out"] = report.ran_out(result["rows"], a.slo_ms)
    return result


def save(a, result: dict):
    with open(a.out, "w") as fh:
        json.dump(result, fh)
