"""Shared prefix KV: N agents whose prompts share a P-token prefix, each with its own S-token suffix,
in-process (no socket), with prefix sharing on (user) and off in one run. Reports the KV blocks
the agents hold against one prefix + N private parts, the TTFT of a new agent arriving while they
are resident (against the TTFT of its private tokens alone), and the agents' tokens/s; the tokens
of both runs must be equal.

    python experiments/bench_prefix.py                                   # random:tiny on CPU
    python experiments/bench_prefix.py --model smollm2-135m --agents 8 --prefix 1024 --private 128
    python experiments/bench_prefix.py --model random:llama-3.1-8b --device cuda --agents 64 \\
        --prefix 8192 --private 1024 --out experiments/results/bench_prefix_h200.json
"""
import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from experiments.harness import stamp  # noqa: E402


def prompts(a, vocab: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(a.seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    return ids(a.prefix), [ids(a.private) for _ in range(a.agents + a.newcomers + 1)]


def ttft_ms(client, sid: int, prompt: list[int], new: int) -> tuple[float, list[int], int]:
    started = time.perf_counter()
    done, times = client.done(client.submit(sid, prompt, new))
    return (times[0] - started) * 1e3, done.tokens, done.cached_tokens


def prefill_flops(args, new: int, context: int) -> float:
    """FLOPs of prefilling `new` tokens whose last lands at position `context`: the linear layers
    per token, and causal attention of each new token over everything before it."""
    h, q, kv, inter = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, \
        args.intermediate_size
    linear = 2 * args.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * inter) * new
    keys = new * (context - new) + new * (new + 1) / 2
    return linear + 4 * args.num_layers * q * keys


def run(a, sharing: str) -> dict:
    overrides = {"model": a.model, "device": a.device, "prefix_sharing": sharing, "policy": a.policy}
    if a.kv_cache_mb:
        overrides["kv_cache_mb"] = a.kv_cache_mb
    engine = build_engine(load_config(None, overrides))
    engine.start()
    try:
        return measure(a, engine, LocalClient(engine))
    finally:
        engine.stop()
        engine.join()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_apart(sharing: str) -> dict:
    """Each side in its own process, so the second starts on a clean device (its pool is sized from
    the memory left free)."""
    with tempfile.TemporaryFile("w+") as out:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", sharing], stdout=out, check=True)
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1])


def measure(a, engine, client) -> dict:
    pool, bs = engine.pool, engine.pool.block_size
    prefix, ends = prompts(a, engine.loaded.model.args.vocab_size)
    alone = []
    for i in range(a.newcomers + 1):           # the first is a warm-up
        sid = client.open()
        alone.append(ttft_ms(client, sid, ends[-1 - i], 1)[0])
        client.close(sid)
    alone = alone[1:]
    first = client.open()
    client.done(client.submit(first, prefix + ends[0], a.new_tokens))        # the prefix is cached now
    sessions = [client.open() for _ in range(a.agents - 1)]
    fed, started = engine.metrics.counters.get("prompt_tokens", 0), time.perf_counter()
    pending = [client.submit(s, prefix + e, a.new_tokens) for s, e in zip(sessions, ends[1:a.agents])]
    outs = [client.done(p)[0].tokens for p in pending]
    wall = time.perf_counter() - started
    fed = engine.metrics.counters.get("prompt_tokens", 0) - fed
    engine.pager.poll()
    held = pool.num_used
    news = [ttft_ms(client, client.open(), prefix + e, a.new_tokens) for e in ends[a.agents:a.agents + a.newcomers]]
    one_private = pool.blocks_for(a.prefix + a.private + a.new_tokens) - a.prefix // bs
    args = engine.loaded.model.args       # the floor on the TTFT ratio: attention over the cached prefix is work too
    floor = prefill_flops(args, a.private, a.prefix + a.private) / prefill_flops(args, a.private, a.private)
    ideal = a.prefix // bs + a.agents * one_private
    return {"kv_blocks_held": held, "kv_blocks_ideal": ideal, "kv_bytes_held": held * pool.block_bytes,
            "kv_ratio": held / ideal, "prompt_tokens_fed": fed,
            "agents_tokens_per_s": (a.agents - 1) * a.new_tokens / wall, "agents_wall_s": wall,
            "new_agent_ttft_ms": statistics.median(t for t, _, _ in news),
            "new_agent_cached_tokens": news[0][2],
            "private_alone_ttft_ms": statistics.median(alone), "ttft_ratio_flop_floor": floor,
            "tokens": outs + [tokens for _, tokens, _ in news],
            "prefix_cache": engine.pager.prefix.status(), "pool_blocks": pool.num_blocks}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--agents", type=int, default=8, help="agents sharing the prefix (the first one caches it)")
    p.add_argument("--prefix", type=int, default=512, help="tokens every agent's prompt starts with")
    p.add_argument("--private", type=int, default=64, help="tokens of each agent's own suffix")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--newcomers", type=int, default=3, help="new agents timed while the others are resident")
    p.add_argument("--policy", default="lru")
    p.add_argument("--kv-cache-mb", type=float, default=0, help="0: the daemon's default (sized from free memory on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--only", choices=("user", "off"), help=argparse.SUPPRESS)   # one side, in a child process
    a = p.parse_args()
    if a.only:
        print("\n" + json.dumps(run(a, a.only)), flush=True)    # the last line: what the parent reads
        return
    rows = {sharing: run_apart(sharing) for sharing in ("user", "off")}
    same = rows["user"].pop("tokens") == rows["off"].pop("tokens")
    report = {**stamp(), "args": vars(a), "tokens_equal": same, "results": rows}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"\n{a.model} on {a.device}: {a.agents} agents, prefix {a.prefix} + private {a.private} tokens, "
          f"{a.new_tokens} new; tokens equal with sharing on and off: {same}")
    print(f"{'sharing':<8} {'KV blocks':>10} {'x ideal':>8} {'fed':>9} {'tok/s':>9} {'new TTFT ms':>12} "
          f"{'private alone ms':>17} {'ratio':>6} {'FLOP floor':>10}")
    for sharing, r in rows.items():
        print(f"{sharing:<8} {r['kv_blocks_held']:>10} {r['kv_ratio']:>8.2f} {r['prompt_tokens_fed']:>9} "
              f"{r['agents_tokens_per_s']:>9.1f} {r['new_agent_ttft_ms']:>12.1f} {r['private_alone_ttft_ms']:>17.1f} "
              f"{r['new_agent_ttft_ms'] / r['private_alone_ttft_ms']:>6.2f} {r['ttft_ratio_flop_floor']:>10.2f}")


if __name__ == "__main__":
    main()
