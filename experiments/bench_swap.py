"""KV paging on a GPU: swap throughput against the pinned PCIe bandwidth measured in the same
run, the added latency of resuming after IO_WAIT (prefetched vs reactive restore vs recompute),
and the time to page-lock the host arena.

    python experiments/bench_swap.py --out results/bench_swap.json

The model is random:llama-2-7b (seeded random weights in real shapes, 0.5 MiB of KV per token):
honest for bytes and latency, meaningless as text.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402


def pinned_bandwidth(nbytes: int, device) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        out[name] = nbytes / (statistics.median(times) * 1e6)
    return out


def resume(client, history_len: int, mode: str, tool_s: float, vocab: int) -> float:
    """TTFT of the next turn after a tool call of tool_s, by the resume path `mode`:
    resident   never evicted (the baseline)
    prefetch   evicted on IO_WAIT, told the expected return: prefetched ahead of it
    reactive   evicted, restored only when the next request arrives (what lru does)
    recompute  the history prefilled again (what the recompute policy does)"""
    history = torch.randint(3, vocab, (history_len,)).tolist()
    session = client.open()
    if mode != "recompute":
        client.done(client.submit(session, history, 1))
    if mode == "prefetch":
        client.set_phase(session, "IO_WAIT", expected_s=tool_s)
    elif mode == "reactive":
        client.set_phase(session, "IO_WAIT")
    time.sleep(tool_s)
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, times = client.done(client.submit(session, history + [5] if mode == "recompute" else [5], 1))
    client.close(session)
    return (times[0] - start) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--history", type=int, default=1024)
    p.add_argument("--swap-tokens", type=int, default=2048)
    p.add_argument("--arena-mb", type=float, default=4096)
    p.add_argument("--tool-s", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="results/bench_swap.json")
    a = p.parse_args()
    device = torch.device("cuda")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": a.model}
    report["pinned_gb_per_s"] = pinned_bandwidth(1 << 30, device)
    engine = build_engine(load_config(None, {"model": a.model, "device": "cuda", "kv_cache_mb": 8192.0,
                                             "host_arena_mb": a.arena_mb}))
    engine.arena.wait_pinned()
    report["arena_pin_s"], report["arena_bytes"] = engine.arena.pin_seconds, engine.arena.size
    engine.start()
    client, vocab = LocalClient(engine), engine.loaded.model.args.vocab_size
    report["swap"] = swap_throughput(client, engine, a.swap_tokens, vocab, a.repeats)
    results = {}
    for mode in ("resident", "prefetch", "reactive", "recompute"):
        resume(client, a.history, mode, a.tool_s, vocab)        # warm-up
        results[mode] = [resume(client, a.history, mode, a.tool_s, vocab) for _ in range(a.repeats)]
    engine.stop()
    report["resume_ttft_ms"] = {k: statistics.median(v) for k, v in results.items()}
    report["resume_ttft_ms_all"] = results
    report["history_tokens"], report["tool_s"] = a.history, a.tool_s
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report)


def swap_throughput(client, engine, tokens: int, vocab: int, repeats: int) -> dict:
    """Swap one session of `tokens` tokens out (IO_WAIT) and back in (ACTIVE), timed by CUDA events."""
    session = client.open()
    client.done(client.submit(session, torch.randint(3, vocab, (tokens - 1,)).tolist(), 1))
    for _ in range(repeats + 1):
        client.set_phase(session, "IO_WAIT")
        torch.cuda.synchronize()
        time.sleep(0.05)
        client.set_phase(session, "ACTIVE")
        time.sleep(0.05)
    client.close(session)
    time.sleep(0.1)
    recs = list(engine.metrics.swaps)[2:]          # the first round trip is the warm-up
    out = {}
    for d in ("out", "in"):
        rs = [r for r in recs if r.direction == d]
        out[d] = {"bytes": rs[0].bytes, "ms_median": statistics.median(r.ms for r in rs),
                  "gb_per_s_median": statistics.median(r.gb_per_s for r in rs)}
    return out


def print_table(r):
    print(f"\n{r['model']} (RANDOM WEIGHTS) on {r['device']}, torch {r['torch']}, {r['date']}")
    pin = r["pinned_gb_per_s"]
    print(f"pinned PCIe measured: h2d {pin['h2d']:.1f} GB/s, d2h {pin['d2h']:.1f} GB/s")
    print(f"host arena {r['arena_bytes'] / 2**30:.1f} GiB page-locked in {r['arena_pin_s']:.2f} s "
          f"({r['arena_pin_s'] / (r['arena_bytes'] / 2**30):.2f} s/GiB)")
    for d, ref in (("out", "d2h"), ("in", "h2d")):
        s = r["swap"][d]
        print(f"swap {d:<3} {s['bytes'] / 2**20:7.0f} MiB  {s['ms_median']:7.2f} ms  {s['gb_per_s_median']:6.1f} GB/s"
              f"  = {100 * s['gb_per_s_median'] / pin[ref]:5.1f}% of pinned {ref}")
    base = r["resume_ttft_ms"]["resident"]
    print(f"resume after a {r['tool_s'] * 1e3:.0f} ms tool call, {r['history_tokens']} tokens of history "
          f"(TTFT of the next token, median):")
    for mode, ms in r["resume_ttft_ms"].items():
        print(f"  {mode:<10} {ms:8.2f} ms   added {ms - base:+8.2f} ms")


if __name__ == "__main__":
    main()
