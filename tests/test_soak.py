"""Soak: churning clients (connect, generate, tool calls that swap, pauses resumed or abandoned,
abandoned streams) and agent processes killed with SIGKILL mid-request, for DJINN_SOAK_S seconds
(20 in CI; run it for an hour with DJINN_SOAK_S=3600). Tokens stay correct throughout; after the
churn the daemon holds no sessions, KV blocks or host blocks, and its RSS and open fds are flat."""
import json
import os
import random
import subprocess
import sys
import threading
import time

import psutil

import libdjinn
from conftest import ROOT, start_daemon, stop_daemon

SOAK_S = float(os.environ.get("DJINN_SOAK_S", "20"))
PROMPTS = [[1, 5, 9, 200], [7] * 30, [11, 400, 3, 3, 90, 12], list(range(3, 60))]


def churn(path: str, expected: dict, stop: threading.Event, seed: int, errors: list, counts: dict):
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            with libdjinn.connect(path, timeout=60) as djinn:
                for _ in range(rng.randrange(1, 4)):
                    one_session(djinn, rng, expected, counts)
        except Exception as e:                # anything but a clean run is a finding
            errors.append(f"{type(e).__name__}: {e}")


def one_session(djinn, rng, expected, counts):
    s, i = djinn.session(), rng.randrange(len(PROMPTS))
    kind = rng.choice(["generate", "tool", "trace", "abandon_trace", "abandon_stream"])
    if kind == "abandon_stream":
        for n, _ in enumerate(s.stream(prompt_ids=PROMPTS[i], max_new_tokens=200, ignore_eos=True)):
            if n == 2:
                break
    elif kind == "abandon_trace":
        for _ in s.trace(prompt_ids=PROMPTS[i], breakpoints=[1], max_new_tokens=8):
            break
    elif kind == "trace":
        trace = s.trace(prompt_ids=PROMPTS[i], breakpoints=[2], steps="all", max_new_tokens=6, ignore_eos=True)
        for _ in trace:
            pass
        assert trace.result.tokens == expected[i], "trace tokens changed"
    if kind != "trace":
        assert s.generate(prompt_ids=PROMPTS[i], max_new_tokens=6, ignore_eos=True).tokens == expected[i], \
            "tokens changed"
    if kind == "tool":                         # IO_WAIT swaps the KV out; the second turn continues it
        with s.tool_call(expected_s=rng.choice([None, 0.05])):
            time.sleep(rng.random() * 0.1)
        assert s.generate(prompt_ids=PROMPTS[i], max_new_tokens=6, ignore_eos=True).tokens == expected[-1 - i], \
            "second-turn tokens changed after a swap"
    counts[kind] = counts.get(kind, 0) + 1
    if rng.random() < 0.5:
        s.close()


def killer(path: str, stop: threading.Event, seed: int, counts: dict):
    """Agent processes killed with SIGKILL mid-generation."""
    rng = random.Random(seed)
    while not stop.is_set():
        job = [{"prompt_ids": PROMPTS[3], "max_new_tokens": 300, "ignore_eos": True}]
        agent = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "agent_proc.py"), path,
                                  json.dumps(job)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5 + rng.random())
        agent.kill()
        agent.wait()
        counts["killed"] = counts.get("killed", 0) + 1


def footprint(proc: psutil.Process) -> tuple[int, int]:
    return proc.memory_info().rss, proc.num_fds()


def test_soak_keeps_tokens_memory_and_fds_flat(tmp_path):
    d = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.5", "--host-arena-mb", "8",
                     "--pause-timeout-s", "2")
    try:
        with libdjinn.connect(d.socket) as djinn:
            expected = {i: djinn.session().generate(prompt_ids=p, max_new_tokens=6, ignore_eos=True).tokens
                        for i, p in enumerate(PROMPTS)}
            for i, p in enumerate(PROMPTS):       # two turns: expected[-1 - i] is the second one
                s = djinn.session()
                s.generate(prompt_ids=p, max_new_tokens=6, ignore_eos=True)
                expected[-1 - i] = s.generate(prompt_ids=p, max_new_tokens=6, ignore_eos=True).tokens
        daemon = psutil.Process(d.proc.pid)
        stop, errors, counts = threading.Event(), [], {}
        workers = [threading.Thread(target=churn, args=(d.socket, expected, stop, seed, errors, counts))
                   for seed in range(3)] + [threading.Thread(target=killer, args=(d.socket, stop, 9, counts))]
        for w in workers:
            w.start()
        time.sleep(SOAK_S / 3)                      # warm-up
        warm = footprint(daemon)
        time.sleep(SOAK_S * 2 / 3)
        stop.set()
        for w in workers:
            w.join(120)
        time.sleep(1.0)                             # killed clients' sessions are released
        rss, fds = footprint(daemon)
        with libdjinn.connect(d.socket) as djinn:
            status = djinn.status()
        print(f"soak {SOAK_S:g} s: {counts}; rss {warm[0] >> 20} -> {rss >> 20} MiB, fds {warm[1]} -> {fds}")
        assert not errors, errors[:5]
        assert counts.get("killed", 0) >= 2 and sum(counts.values()) > 20
        assert [s["id"] for s in status["sessions"]] == [] and status["memory"]["kv_blocks_used"] == 0
        assert status["memory"]["host_arena_used_bytes"] == 0
        assert rss - warm[0] < 30 * 2**20
        assert fds <= warm[1]
        assert d.alive()
    finally:
        stop_daemon(d)
