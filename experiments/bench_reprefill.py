"""What re-prefilling dropped KV while the GPU is idle buys: an agent in a tool call loses its KV to a
burst (a one-off request of another session, no host arena to swap to), the burst ends, and the agent
returns after its tool call with a tool result. Its resumed TTFT is measured three ways in the same
engine: never dropped (no burst), dropped with re-prefill off (the history is prefilled again when
the request comes), dropped with re-prefill on (semantic, engine/reprefill.py). Table last, JSON to --out.

    python experiments/bench_reprefill.py --model random:tiny --device cpu --contexts 256,512 --tool-s 0.5
    python experiments/bench_reprefill.py --model random:llama-3.1-8b --device cuda --dtype bfloat16 \\
        --contexts 8192,16384,32768 --tool-s 4 --out experiments/results/reprefill_h200.json
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine, resolve_device, resolve_dtype  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from djinnd.memory.block_pool import bytes_per_block  # noqa: E402
from djinnd.model.loader import model_args  # noqa: E402
from experiments.harness import stamp  # noqa: E402

BLOCK = 16
MODES = ("resident", "dropped", "reprefilled")
COUNTERS = ("kv_reprefills", "kv_reprefill_tokens", "kv_reprefill_reused_tokens", "kv_reprefill_s",
            "kv_drops_device", "recomputed_tokens")


def pool_mib(model: str, device: str, dtype: str, tokens: int) -> float:
    args = model_args(model)
    per_block = bytes_per_block(args.num_layers, args.num_kv_heads, args.head_dim, BLOCK,
                                resolve_dtype(dtype, resolve_device(device)))
    return (-(-tokens // BLOCK) + 2) * per_block / 2**20


def burst_tokens(engine, context: int, new_tokens: int) -> int:
    """A prompt that needs a few blocks more than the pool has free beside the agent's history."""
    pool = engine.pool.num_blocks * BLOCK
    return pool - (context + new_tokens) + 4 * BLOCK - new_tokens


def trial(engine, client, rng, mode: str, context: int, a: argparse.Namespace) -> dict:
    """One agent's two turns around a tool call; the burst (mode != resident) drops its KV meanwhile."""
    vocab = engine.loaded.model.args.vocab_size
    prompt = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    engine.reprefill.enabled = mode == "reprefilled"    # read by the engine thread only while it is idle
    before = {k: engine.metrics.counters.get(k, 0) for k in COUNTERS}
    agent = client.open()
    client.done(client.submit(agent, prompt(context), a.new_tokens))
    client.set_phase(agent, "IO_WAIT", expected_s=a.tool_s)
    away = time.perf_counter()
    if mode != "resident":
        burst = client.open()
        client.done(client.submit(burst, prompt(burst_tokens(engine, context, a.new_tokens)), a.new_tokens))
        client.close(burst)
    burst_s = time.perf_counter() - away
    time.sleep(max(0.0, a.tool_s - burst_s))
    client.set_phase(agent, "ACTIVE")
    sent = time.perf_counter()
    done, times = client.done(client.submit(agent, prompt(a.result_tokens), a.new_tokens))
    client.close(agent)
    after = {k: engine.metrics.counters.get(k, 0) - before[k] for k in COUNTERS}
    return {"mode": mode, "context": context, "ttft_ms": (times[0] - sent) * 1e3, "burst_s": burst_s,
            "cached_tokens": done.cached_tokens, "late": burst_s > a.tool_s, **after}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--contexts", default="256,512", help="comma-separated history lengths")
    p.add_argument("--result-tokens", type=int, default=512, help="the tool result's tokens (the resumed prompt)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tool-s", type=float, default=1.0, help="tool call duration (expected_s is the same)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    per_agent = max(contexts) + a.result_tokens + 2 * a.new_tokens
    # room for the longest agent and its re-prefill above the low-water mark, not for the burst beside it
    pool_tokens = int(1.2 * per_agent)
    mib = pool_mib(a.model, a.device, a.dtype, pool_tokens)
    engine = build_engine(load_config(None, {"model": a.model, "device": a.device, "dtype": a.dtype,
                                             "policy": "semantic", "kv_cache_mb": mib, "host_arena_mb": 0,
                                             "max_model_len": pool_tokens + 4 * BLOCK}))
    engine.arena.wait_pinned()
    engine.start()
    rows = []
    try:
        client, rng = LocalClient(engine), random.Random(0)
        trial(engine, client, rng, "resident", min(contexts), a)       # warm-up: first forwards compile/allocate
        for context in contexts:
            for _ in range(a.repeats):
                for mode in MODES:
                    rows.append(trial(engine, client, rng, mode, context, a))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.stop()
        engine.join()
        engine.arena.close()
    summary = [{"context": c, **{m: min(r["ttft_ms"] for r in rows if r["context"] == c and r["mode"] == m)
                                 for m in MODES}} for c in contexts]
    out = {**stamp(), "model": a.model, "dtype": a.dtype, "kv_cache_mib": mib, "tool_s": a.tool_s,
           "result_tokens": a.result_tokens, "trials": rows, "best_ttft_ms": summary}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    print(f"\nresumed TTFT (ms, best of {a.repeats}) after a {a.tool_s} s tool call, {a.result_tokens}-token result")
    print(f"{'context':>8} {'resident':>10} {'dropped':>10} {'reprefilled':>12}")
    for s in summary:
        print(f"{s['context']:>8} {s['resident']:>10.1f} {s['dropped']:>10.1f} {s['reprefilled']:>12.1f}")


if __name__ == "__main__":
    main()
