"""Runs for experiments/exp1_agents.py: one daemon and its agent processes per (policy, N), the HF
process-per-agent baseline, and Experiment 3's paused sessions. Each returns one result row."""
import json
import os
import subprocess
import sys
import threading
import time

import libdjinn
from experiments import exp1_report as report
from experiments.harness import ROOT, start_daemon, stop_daemon
from libdjinn import plots

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20
BLOCK = 16          # tokens per KV block (djinnd's default block_size)


def workload(a, n: int) -> dict:
    """KV sizes of the workload, from the model's shape: what to cap the pool at."""
    from djinnd.model.loader import model_args
    shape = model_args(a.model)
    elem = 4 if a.dtype == "float32" or (a.dtype == "auto" and not a.device.startswith("cuda")) else 2
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * elem
    agent_tokens = a.context + (a.turns - 1) * a.growth + a.turns * a.new_tokens
    total = n * -(-agent_tokens // BLOCK) * BLOCK * per_token         # whole KV blocks
    pool_mb = a.kv_cache_mb or max(total / a.oversubscribe, 2.2 * agent_tokens * per_token) / MiB  # 2 agents at least
    return {"kv_bytes_per_token": per_token, "agent_tokens": agent_tokens, "total_kv_bytes": total,
            "kv_cache_mb": pool_mb, "host_arena_mb": 1.1 * max(0.0, total / MiB - pool_mb) + 16,   # what is swapped
            "vocab": shape.vocab_size,
            "layers": shape.num_layers, "preset": a.model.split(":", 1)[-1]}


def daemon_flags(a, shape: dict, policy: str, kv_cache_mb: float) -> list[str]:
    return ["--model", a.model, "--device", a.device, "--dtype", a.dtype, "--policy", policy,
            "--kv-cache-mb", f"{kv_cache_mb:.3f}", "--host-arena-mb", f"{shape['host_arena_mb']:.1f}",
            "--timeline-period-ms", f"{timeline_period_ms(a):.0f}", *a.daemon_flags.split()]


def timeline_period_ms(a) -> float:
    """50 ms, or coarser when the largest N's run would outlast the daemon's 4,096 samples."""
    if a.exp3:
        return 50.0                 # tens of seconds
    longest_tool = a.tool_max if a.tool_dist == "uniform" else 4 * a.tool_median
    run_s = max(a.sizes, default=a.agents) * a.time_scale / a.rate + a.turns * longest_tool * a.time_scale + 30
    return max(50.0, 1e3 * run_s / 3000)


def spawn_at(script: str, args_of, agents: list[dict]) -> list[dict]:
    """Start each agent process at its arrival time; wait for all; their JSON results in order."""
    procs, t0 = [], time.monotonic()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))}
    for job in agents:
        time.sleep(max(0.0, t0 + job["arrive_s"] - time.monotonic()))
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, script), *args_of(job)],
                                      stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    return [parse(p.communicate()[0]) for p in procs]


def parse(out: str) -> dict:
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": "crashed"}


def run_policy(a, shape: dict, policy: str, agent_sets: list[list[dict]]) -> list[dict]:
    """One daemon per policy; the sweep's agent sets run on it one after another (each set starts
    when the last one's agents are gone). One row per set, from the daemon's counters before and after."""
    pool_mb = shape["kv_cache_mb"] if policy != "resident" else shape["total_kv_bytes"] / MiB + 16
    try:
        daemon, sock = start_daemon(*daemon_flags(a, shape, "none" if policy == "resident" else policy, pool_mb))
    except RuntimeError as e:        # e.g. a resident pool larger than the device
        return [report.not_run(policy, len(agents), str(e)) for agents in agent_sets]
    rows = []
    try:
        with libdjinn.connect(sock) as djinn:
            for agents in agent_sets:
                before, started = observe(djinn), time.time()
                results = spawn_at("exp1_agent.py", lambda job: [sock, json.dumps(job)], agents)
                after = observe(djinn)
                png = f"{os.path.splitext(a.out)[0]}_{policy}_n{len(agents)}.png"
                timeline = [t for t in after["timeline"] if t["t"] >= started]
                plots.plot_timeline(timeline, png, title=f"policy {policy}, {len(agents)} agents")
                rows.append(report.row(policy, len(agents), started, results, before, after, timeline, a.slo_ms)
                            | {"timeline_png": png})
    finally:
        stop_daemon(daemon)
    return rows


def observe(djinn) -> dict:
    status, swaps = djinn.status(), djinn.request("swaps")
    return {"counters": status["counters"], "memory": status["memory"],
            "latency": swaps["latency_samples_ms"], "timeline": djinn.request("timeline")["timeline"]}


def run_hf(a, shape: dict, agents: list[dict]) -> dict:
    """One HF transformers process per agent, arriving as the daemon's agents did."""
    base = {"preset": shape["preset"], "device": a.device}
    started = time.time()
    results = spawn_at("exp1_hf_agent.py", lambda job: [json.dumps(base | job)], agents)
    return report.row("hf-per-agent", len(agents), started, results, None, None, [], a.slo_ms)


def run_exp3(a) -> dict:
    """N sessions paused at breakpoints half the time, KV + weights over the budget, then the same
    sessions on a pool that holds them all: the tokens must be equal."""
    n, a.context = a.exp3_sessions, a.exp3_context
    shape = workload(a, n)
    agents = [{"seed": a.seed * 100003 + i, "context": a.context, "growth": a.growth, "new_tokens": a.new_tokens,
               "rounds": a.turns, "pause_s": a.exp3_pause_s, "idle_s": a.exp3_pause_s,
               "layer": shape["layers"] // 2, "vocab": shape["vocab"], "arrive_s": 2 * a.exp3_pause_s * i / n}
              for i in range(n)]
    pressured = exp3_once(a, shape, agents, shape["kv_cache_mb"], "pressured")
    free = exp3_once(a, shape, agents, 1.1 * shape["total_kv_bytes"] / MiB + 1, "unpressured")
    same = [p is not None and p == f for p, f in zip(pressured["tokens"], free["tokens"])]
    return {"experiment": 3, "args": vars(a), "workload": shape, "pressured": pressured, "unpressured": free,
            "sessions_with_equal_tokens": sum(same), "sessions": n}


def exp3_once(a, shape: dict, agents: list[dict], pool_mb: float, label: str) -> dict:
    daemon, sock = start_daemon(*daemon_flags(a, shape, "semantic", pool_mb))
    paused, stop = [], threading.Event()
    watcher = threading.Thread(target=count_paused, args=(sock, paused, stop), daemon=True)
    try:
        watcher.start()
        results = spawn_at("exp3_agent.py", lambda job: [sock, json.dumps(job)], agents)
        stop.set()
        watcher.join()
        with libdjinn.connect(sock) as djinn:
            status, timeline = djinn.status(), djinn.request("timeline")["timeline"]
    finally:
        stop_daemon(daemon)
    png = f"{os.path.splitext(a.out)[0]}_{label}.png"
    plots.plot_timeline(timeline, png, title=f"Experiment 3, {label}: {len(agents)} sessions, half paused")
    return report.exp3_row(label, results, status, timeline, paused) | {"timeline_png": png}


def count_paused(sock: str, samples: list, stop: threading.Event):
    """How many sessions sit at a breakpoint, sampled from the daemon's status."""
    with libdjinn.connect(sock) as djinn:
        while not stop.wait(0.2):
            rows = djinn.status()["sessions"]
            samples.append((sum(r["state"] == "paused" for r in rows), len(rows)))
