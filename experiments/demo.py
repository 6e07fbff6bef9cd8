"""The main job: one djinnd on the embedded model, a handful of agent processes sharing it.

    python experiments/demo.py [--agents 4]

Starts djinnd on a private socket, runs agents/tool_agent.py in N separate processes at once,
prints what each agent did and `djinnctl status`, then stops the daemon.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from experiments.harness import ROOT, start_daemon, stop_daemon  # noqa: E402
from libdjinn.ctl import format_status  # noqa: E402
TASKS = ["What is 17 * 23?", "What is 1234 + 4321?", "What is 99 - 45?", "What is 144 / 12?",
         "What is 7 * 8 * 9?", "What is 1000 - 1?", "What is 25 * 25?", "What is 81 / 9?"]


def status_when_all_connected(socket_path: str, num_agents: int, timeout_s=60) -> str:
    """`djinnctl status` as text, taken once every agent has a session open."""
    with libdjinn.connect(socket_path) as djinn:
        deadline = time.time() + timeout_s
        report = djinn.status()
        while len(report["sessions"]) < num_agents and time.time() < deadline:
            time.sleep(0.2)
            report = djinn.status()
    report.pop("type"), report.pop("id")
    return format_status(report)


def main():
    p = argparse.ArgumentParser(description="djinnd plus N agent processes on one resident model")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args()
    started = time.time()
    daemon, socket_path = start_daemon("--model", a.model)
    print(f"djinnd ready on {socket_path} ({a.model})")
    try:
        agents = [subprocess.Popen([sys.executable, os.path.join(ROOT, "agents", "tool_agent.py"), "--json",
                                    "--socket", socket_path, "--task", TASKS[i % len(TASKS)]],
                                   stdout=subprocess.PIPE, text=True) for i in range(a.agents)]
        status = status_when_all_connected(socket_path, a.agents)
        for agent in agents:
            out, _ = agent.communicate()
            if agent.returncode != 0:
                raise SystemExit(f"agent pid {agent.pid} failed")
            r = json.loads(out)
            print(f"\n[agent {agent.pid}] {r['task']}\n  thought: {r['thought']}\n  tool:    "
                  f"calculator({r['tool']['calculator']}) = {r['tool']['result']}\n  answer:  {r['answer']}"
                  f"\n  (turn 2 reused {r['history_reused_tokens']} tokens of resident KV)")
        print(f"\n== djinnctl status, with {a.agents} agents connected ==\n{status}")
        print(f"{a.agents} agent processes served by one resident model in {time.time() - started:.1f} s")
    finally:
        stop_daemon(daemon)


if __name__ == "__main__":
    main()
