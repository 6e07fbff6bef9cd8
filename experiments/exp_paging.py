"""Experiment: many tool-using agents on a KV pool far smaller than their total KV, one daemon per
policy in the same run (semantic, lru, recompute, none). Each agent is a real process: prompt,
generate, a tool call (IO_WAIT), generate again.

    python experiments/exp_paging.py --agents 24 --out results/exp_paging.json

Reports per policy: agents finished and refused, wall time, swap traffic, and the time to the
first token of the turn after the tool call (by how the KV was found). Also writes each
policy's memory timeline as a PNG beside the JSON. Default model: random:tiny on CPU.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from experiments.harness import ROOT, start_daemon, stamp, stop_daemon  # noqa: E402
from libdjinn import plots  # noqa: E402

AGENT = """
import json, sys, time, random, libdjinn
sock, seed, tool_s, new = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
with libdjinn.connect(sock) as djinn:
    s = djinn.session()
    try:
        s.generate(prompt_ids=[rng.randrange(3, 500) for _ in range(64)], max_new_tokens=new, ignore_eos=True)
        with s.tool_call(expected_s=tool_s):
            time.sleep(tool_s)
        g = s.generate(prompt_ids=[rng.randrange(3, 500) for _ in range(8)], max_new_tokens=new, ignore_eos=True)
        print(json.dumps({"ok": True, "tokens": g.tokens}))
    except libdjinn.DjinnError as e:
        print(json.dumps({"ok": False, "error": e.code.name}))
"""


def run_policy(policy: str, a) -> dict:
    flags = ["--model", a.model, "--policy", policy, "--kv-cache-mb", str(a.kv_cache_mb), "--device", a.device,
             "--timeline-period-ms", "20"]
    daemon, sock = start_daemon(*flags)
    started = time.time()
    try:
        agents = [subprocess.Popen([sys.executable, "-c", AGENT, sock, str(i), str(a.tool_s), str(a.new_tokens)],
                                   stdout=subprocess.PIPE, text=True, cwd=ROOT) for i in range(a.agents)]
        results = [json.loads(agent.communicate()[0] or '{"ok": false, "error": "crashed"}') for agent in agents]
        wall = time.time() - started
        with libdjinn.connect(sock) as djinn:
            status, swaps = djinn.status(), djinn.request("swaps")
            timeline = djinn.request("timeline")["timeline"]
    finally:
        stop_daemon(daemon)
    plots.plot_timeline(timeline, f"{os.path.splitext(a.out)[0]}_{policy}.png", title=f"policy {policy}")
    c = status["counters"]
    return {"policy": policy, "finished": sum(r["ok"] for r in results),
            "refused": sum(not r["ok"] for r in results), "wall_s": wall,
            "swap_mib": (c.get("swap_bytes_out", 0) + c.get("swap_bytes_in", 0)) / 2**20,
            "prompt_tokens": c.get("prompt_tokens", 0),
            "ttft_ms": {k: v.get("p50") for k, v in swaps["latency_ms"].items() if k.startswith("ttft")},
            "kv_pool_bytes": status["memory"]["kv_pool_bytes"],
            "kv_pool_peak_bytes": max(s["kv_pool_used_bytes"] for s in timeline),
            "tokens": [r.get("tokens") for r in results], "timeline": timeline}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=24)
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-mb", type=float, default=0.5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tool-s", type=float, default=0.5)
    p.add_argument("--out", default="results/exp_paging.json")
    a = p.parse_args()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    rows = [run_policy(policy, a) for policy in ("semantic", "lru", "recompute", "none")]
    reference = rows[0]["tokens"]
    for r in rows:   # tokens must not depend on the policy, for every agent that finished
        r["tokens_match_semantic"] = all(t is None or u is None or t == u for t, u in zip(r["tokens"], reference))
    with open(a.out, "w") as fh:
        json.dump({**stamp(), "args": vars(a), "rows": rows}, fh)
    print(f"\n{a.agents} agents, model {a.model} on {a.device}, KV pool {a.kv_cache_mb} MiB, "
          f"tool call {a.tool_s} s")
    print(f"{'policy':<10} {'done':>5} {'refused':>7} {'wall s':>7} {'swap MiB':>9} {'prefill tok':>11} "
          f"{'peak/pool':>9} {'same tokens':>11}  ttft p50 ms by path")
    for r in rows:
        ttft = ", ".join(f"{k[5:] or 'all'} {v:.1f}" for k, v in r["ttft_ms"].items() if v is not None)
        print(f"{r['policy']:<10} {r['finished']:>5} {r['refused']:>7} {r['wall_s']:>7.1f} {r['swap_mib']:>9.2f} "
              f"{r['prompt_tokens']:>11} {r['kv_pool_peak_bytes'] / r['kv_pool_bytes']:>9.2f} "
              f"{str(r['tokens_match_semantic']):>11}  {ttft}")


if __name__ == "__main__":
    main()
