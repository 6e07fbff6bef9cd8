"""Breakpoint costs on a GPU, through a real djinnd: the time from resume to the next layer
starting, the activation handoff, and, next to them, the time moving the session's KV over PCIe
would take (measured pinned bandwidth, same run): the proof that the KV never left the GPU.

    python experiments/bench_breakpoints.py --out results/bench_breakpoints.json

random:llama-2-7b: seeded random weights in real shapes (0.5 MiB of KV per token).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from experiments.bench_swap import pinned_bandwidth  # noqa: E402
from experiments.harness import start_daemon, stamp, stop_daemon  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--layer", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--out", default="results/bench_breakpoints.json")
    a = p.parse_args()
    pcie = pinned_bandwidth(1 << 30, torch.device("cuda"))
    torch.cuda.empty_cache()
    daemon, sock = start_daemon("--model", a.model, "--device", "cuda", "--kv-cache-mb", "4096",
                                "--host-arena-mb", "1024")
    try:
        prompt = torch.randint(3, 32000, (a.context - 1,), generator=torch.Generator().manual_seed(0)).tolist()
        steps = list(range(a.decode_steps + 1))
        with libdjinn.connect(sock) as djinn:
            djinn.session().generate(prompt_ids=prompt[:64], max_new_tokens=2, ignore_eos=True)     # warm-up
            plain = djinn.session().generate(prompt_ids=prompt, max_new_tokens=len(steps), ignore_eos=True)
            calls, shapes = [], []
            trace = djinn.session().trace(prompt_ids=prompt, max_new_tokens=len(steps), ignore_eos=True,
                                          breakpoints=[a.layer], steps=steps)
            for bp in trace:
                shapes.append(bp.shape)
                started = time.perf_counter()
                bp.resume()
                calls.append((time.perf_counter() - started) * 1e3)
            latency = djinn.request("swaps")["latency_ms"]
    finally:
        stop_daemon(daemon)
    kv_bytes = a.context * 0.5 * 2**20
    report = {**stamp(), "device": torch.cuda.get_device_name(), "model": a.model, "context": a.context,
              "layer": a.layer, "pinned_gb_per_s": pcie, "tokens_match_unpaused": trace.result.tokens == plain.tokens,
              "pause_shapes": shapes, "resume_call_ms": calls,
              "engine_resume_to_next_layer_ms": latency["breakpoint_resume"],
              "handoff_out_ms": latency["breakpoint_handoff_out"],
              "kv_over_pcie_ms": kv_bytes / (pcie["h2d"] * 1e6)}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    r = report
    print(f"\n{a.model} (RANDOM WEIGHTS) on {r['device']}, {r['date']}: pause after layer {a.layer}, "
          f"{a.context} tokens of context")
    print(f"tokens equal to the unpaused run: {r['tokens_match_unpaused']}")
    print(f"resume() round trip (client, socket + engine ack): prompt forward {calls[0]:.2f} ms, "
          f"decode median {statistics.median(calls[1:]):.2f} ms")
    e, h = r["engine_resume_to_next_layer_ms"], r["handoff_out_ms"]
    print(f"engine: resume -> next layer starts (incl. shared memory -> device copy): p50 {e['p50']:.2f} ms, "
          f"max {e['max']:.2f} ms over {e['count']} pauses")
    print(f"engine: hidden states device -> shared memory: p50 {h['p50']:.2f} ms, max {h['max']:.2f} ms "
          f"(largest {max(s[0] for s in shapes)}x{shapes[0][1]})")
    print(f"moving this session's KV ({kv_bytes / 2**20:.0f} MiB) over PCIe instead: {r['kv_over_pcie_ms']:.2f} ms "
          f"at the measured {pcie['h2d']:.1f} GB/s")


if __name__ == "__main__":
    main()
