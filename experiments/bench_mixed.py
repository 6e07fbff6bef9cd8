"""Mixed load: N sessions decoding while long prompts arrive, one after another. Decode TPOT p50/p99
while prompts arrive against decode alone, and prefill tokens/s meanwhile against prefill alone, for
each step-time budget (max_step_ms; 0: off), with one forward per mixed step or two (mixed_steps),
on one in-process engine each, in the same run.

    python experiments/bench_mixed.py --model random:llama-3.1-8b --sessions 32 --context 1024 \
        --prompt-len 32768 --arrivals 3 --max-step-ms 0,15,30,60

TPOT is the gap between consecutive tokens of one session (p50/p99 over all sessions' gaps), counted
once every session has its first token (before 2026-12-02 decode alone also counted gaps while its
batch was still forming, which the window with prompts arriving never did); with prompts
arriving, only gaps that end between the first arrival and the last prompt's first token.
Random presets are seeded random weights in real shapes: honest for speed and memory, not text.
"""
import argparse
import contextlib
import gc
import json
import os
import queue
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine, freeze_startup_heap  # noqa: E402
from djinnd.engine import commands as cmd  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from djinnd.metrics import summary  # noqa: E402
from experiments.harness import stamp  # noqa: E402
from experiments.profile_decode import kernel_sums  # noqa: E402
from experiments.tail_trace import full_collections, slowest_steps, trace_steps, watch_gc, worst_gaps  # noqa: E402


def tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def token_times(events: queue.Queue) -> list[float]:
    """Arrival times of the tokens an event queue holds now (a closed session's Failed ends it)."""
    times = []
    while not events.empty():
        t, e = events.get_nowait()
        if isinstance(e, cmd.Token):
            times.append(t)
    return times


def gaps_ms(times: list[list[float]], start: float = 0.0, end: float = float("inf")) -> list[float]:
    return [1e3 * (b - a) for t in times for a, b in zip(t, t[1:]) if start <= b <= end]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_decoders(client, a, vocab: int, new_tokens: int, seed: int):
    """a.sessions sessions fed a.context tokens (untimed), then decoding new_tokens each; and when the
    last of them had its first token (decode is steady from there)."""
    sessions = [client.open() for _ in range(a.sessions)]
    for e in [client.submit(s, tokens(a.context - 1, vocab, seed + i), 1) for i, s in enumerate(sessions)]:
        client.done(e)
    pending, ready = [client.submit(s, [5], new_tokens) for s in sessions], 0.0
    for e in pending:
        first = e.get(timeout=600)
        if not isinstance(first[1], cmd.Token):
            raise RuntimeError(f"a decoding session failed: {first[1]}")
        e.put(first)
        ready = max(ready, first[0])
    return sessions, pending, ready


def prefill_s(client, prompt) -> float:
    session = client.open()
    started = time.perf_counter()
    client.done(client.submit(session, prompt, 1))
    client.close(session)
    return time.perf_counter() - started


def measure(a, max_step_ms: float, mixed_steps: bool) -> dict:
    engine = build_engine(load_config(None, {"model": a.model, "device": a.device, "kv_cache_mb": a.kv_cache_mb,
                                             "max_num_seqs": a.sessions + 1, "max_step_ms": max_step_ms,
                                             "mixed_steps": mixed_steps}))
    steps, collections = trace_steps(engine), watch_gc()
    if a.gc == "freeze":
        freeze_startup_heap()          # as the daemon does before it serves
    engine.start()
    client, vocab = LocalClient(engine), engine.loaded.model.args.vocab_size
    prefill_s(client, tokens(min(a.prompt_len, 4096), vocab, 1))                     # warm-up
    alone_s = prefill_s(client, tokens(a.prompt_len, vocab, 2))
    sessions, pending, alone_ready = start_decoders(client, a, vocab, a.decode_tokens, 100)    # decode alone
    alone = [client.done(e)[1] for e in pending]
    for s in sessions:
        client.close(s)
    sessions, pending, _ = start_decoders(client, a, vocab, a.max_new_tokens, 10_000)
    mixed_before = engine.metrics.counters.get("mixed_steps", 0)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if a.profile else None
    started, prompts_s = time.perf_counter(), []
    with profiler or contextlib.nullcontext():
        for i in range(a.arrivals):                # back to back: the next prompt arrives as one finishes
            prompts_s.append(prefill_s(client, tokens(a.prompt_len, vocab, 1000 + i)))
    ended = time.perf_counter()
    profiled_steps = engine.metrics.counters.get("mixed_steps", 0) - mixed_before
    for s in sessions:
        client.close(s)
    mixed = [token_times(e) for e in pending]
    engine.stop()
    engine.join()
    gc.callbacks.clear()
    gc.unfreeze()                      # the next engine's start freezes its own heap; this one may go
    alone_gaps, mixed_gaps = gaps_ms(alone, alone_ready), gaps_ms(mixed, started, ended)   # both: steady decode
    row = {"decode_alone": {"tpot_p50_ms": percentile(alone_gaps, 0.5), "tpot_p99_ms": percentile(alone_gaps, 0.99)},
           "prefill_alone_tps": a.prompt_len / alone_s,
           "mixed": {"tpot_p50_ms": percentile(mixed_gaps, 0.5), "tpot_p99_ms": percentile(mixed_gaps, 0.99),
                     "prefill_tps": a.arrivals * a.prompt_len / (ended - started),
                     "decode_tps": len(mixed_gaps) / (ended - started), "window_s": ended - started,
                     "steps_ended_early": any(len(t) >= a.max_new_tokens for t in mixed)},
           "budget": engine.scheduler.budget.status(), "mixed_steps": engine.metrics.counters.get("mixed_steps", 0),
           "step_beside_decode_ms": summary(list(engine.metrics.latency.get("step_beside_decode", []))),
           "prompts_s": prompts_s, "worst_gaps": worst_gaps(mixed, started, ended),
           "worst_gaps_alone": worst_gaps(alone, alone_ready, float("inf")),
           "slowest_steps": slowest_steps(steps, started, ended), "gc": a.gc,
           "full_collections": full_collections(collections, started, ended),
           "slowest_steps_alone": slowest_steps(steps, alone_ready, max(t[-1] for t in alone))}
    if a.profile:        # GPU kernels per mixed step, summed by name (inside graph replays too)
        sums = kernel_sums(profiler, max(profiled_steps, 1))
        row["kernels_per_mixed_step"] = dict(sorted(sums.items(), key=lambda kv: -kv[1][0])[:a.profile])
    row["tpot_p99_vs_alone"] = row["mixed"]["tpot_p99_ms"] / row["decode_alone"]["tpot_p99_ms"]
    row["prefill_share_of_alone"] = row["mixed"]["prefill_tps"] / row["prefill_alone_tps"]
    print(f"  max_step_ms {max_step_ms} mixed_steps {mixed_steps}: {json.dumps(row)}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-mb", type=float, default=0, help="0: the engine's default")
    p.add_argument("--sessions", type=int, default=32, help="sessions decoding")
    p.add_argument("--context", type=int, default=1024, help="tokens each decoding session holds first")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens of the decode-alone phase")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="decode budget while prompts arrive")
    p.add_argument("--prompt-len", type=int, default=32768, help="tokens of each arriving prompt")
    p.add_argument("--arrivals", type=int, default=3)
    p.add_argument("--max-step-ms", default="0,15,30,60", help="step-time budgets to compare (0: off)")
    p.add_argument("--mixed-steps", default="0,1", help="one forward per mixed step: off (0), on (1), or both")
    p.add_argument("--gc", choices=["freeze", "default"], default="freeze",
                   help="freeze the start-up heap as the daemon does, or leave Python's collector as it is")
    p.add_argument("--profile", type=int, default=0, help="list this many GPU kernels per mixed step (torch profiler; CUDA only)")
    p.add_argument("--out", default="results/bench_mixed.json")
    a = p.parse_args()
    budgets = [float(x) for x in a.max_step_ms.split(",")]
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else a.device
    runs = {}
    for ms in budgets:
        for mixed in [int(x) for x in a.mixed_steps.split(",")]:
            runs[f"{ms:g} {'mixed' if mixed else 'split'}"] = measure(a, ms, bool(mixed))
            gc.collect()                 # the last engine's pool and graphs go before the next sizes its pool
            if device == "cuda":
                torch.cuda.empty_cache()
    report = {**stamp(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "model": a.model, "sessions": a.sessions, "context": a.context,
              "prompt_len": a.prompt_len, "arrivals": a.arrivals, "gc": a.gc, "runs": runs}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report)


def print_table(r):
    print(f"\n{r['model']} on {r['device']} (torch {r['torch']}, {r['date']}): {r['sessions']} sessions decoding at "
          f"{r['context']} tokens while {r['arrivals']} prompts of {r['prompt_len']} tokens arrive")
    print(f"{'max_step_ms forward':>19} {'alone p50/p99':>15} {'mixed p50/p99':>15} {'p99 x alone':>11} "
          f"{'prefill tok/s':>13} {'of alone':>8} {'steps p50/p99 ms':>17}")
    for ms, x in r["runs"].items():
        al, mx = x["decode_alone"], x["mixed"]
        print(f"{ms:>19} {al['tpot_p50_ms']:>7.1f}/{al['tpot_p99_ms']:<7.1f} {mx['tpot_p50_ms']:>7.1f}/"
              f"{mx['tpot_p99_ms']:<7.1f} {x['tpot_p99_vs_alone']:>11.2f} {mx['prefill_tps']:>13.0f} "
              f"{100 * x['prefill_share_of_alone']:>7.0f}% {_steps(x.get('step_beside_decode_ms', {})):>17}")


def _steps(s: dict) -> str:
    """Time of the steps beside decoding rows: CUDA events on a GPU, the host's clock on CPU (timed only
    with a step budget). A TPOT tail above the steps' p99 is made between steps, not in them."""
    return f"{s['p50']:.1f}/{s['p99']:.1f}" if s.get("count") else "-"


if __name__ == "__main__":
    main()
