"""Does paging change tokens? The same agents run one turn at a time (so every batch holds one
request and its shapes are the same in both runs) under a pool too small for them, then under a
pool that holds them all with paging off; tokens must be equal, in fp16 too. Tool calls are short,
so prefetches, lazy evictions and evictions for a prefetch's room overlap other agents' compute.
This isolates paging from batch composition, which changes fp16 rounding on its own. With
--profile long the arena holds one agent, so KV is dropped and its history prefilled again (in
other chunks than the first time: exact in fp32, which is what that profile runs).

    python experiments/check_paging_exact.py                           # embedded model on CPU
    python experiments/check_paging_exact.py --model random:llama-2-7b --device cuda
    python experiments/check_paging_exact.py --profile long --model random:tiny --context 128 \
        --growth-min 16 --growth-max 64 --new-tokens 8      # long profile in miniature: KV dropped too
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine, resolve_device, resolve_dtype  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from djinnd.memory.block_pool import bytes_per_block  # noqa: E402
from djinnd.model.loader import model_args  # noqa: E402
from experiments.harness import stamp  # noqa: E402

BLOCK = 16      # djinnd's default block_size
MOVES = ("swaps_out_pressure", "swaps_out_lazy", "swaps_out_prefetch_room", "swaps_in_prefetch",
         "swaps_in_restore", "kv_drops_device", "kv_drops_host", "resumed_dropped")
LONG = {"agents": 6, "turns": 6, "context": 2048, "growth_min": 256, "growth_max": 1024, "new_tokens": 32,
        "pool_agents": 2.0, "arena_agents": 1.0, "policies": "semantic,lru,recompute", "dtypes": "float32"}


def run_agents(model: str, device: str, dtype: str, policy: str, kv_cache_mb: float, host_arena_mb: float,
               agents: int, turns: int, context: int, growth, new_tokens: int, tool_s: float) -> tuple[list, dict]:
    """Every agent's tokens per turn, and the engine's counters (resumed_dropped: turns that found
    their KV dropped and prefilled the history again). growth: tokens a tool result appends, or a
    (min, max) range drawn per turn."""
    engine = build_engine(load_config(None, {"model": model, "device": device, "dtype": dtype, "policy": policy,
                                             "kv_cache_mb": kv_cache_mb, "host_arena_mb": host_arena_mb,
                                             "prefetch_lead_ms": 10.0}))
    engine.arena.wait_pinned()
    engine.start()
    try:
        client, rng = LocalClient(engine), random.Random(0)
        vocab = engine.loaded.model.args.vocab_size
        sessions = [client.open() for _ in range(agents)]
        tokens = [[] for _ in sessions]
        for turn in range(turns):
            for i, s in enumerate(sessions):
                if turn:
                    client.set_phase(s, "ACTIVE")
                size = context if turn == 0 else growth if isinstance(growth, int) else rng.randint(*growth)
                prompt = [rng.randrange(3, vocab) for _ in range(size)]
                tokens[i].append(client.done(client.submit(s, prompt, new_tokens))[0].tokens)
                client.set_phase(s, "IO_WAIT", expected_s=tool_s)
        dropped = len(engine.metrics.latency.get("ttft_dropped", ()))
        return tokens, dict(engine.metrics.counters) | {"resumed_dropped": dropped}
    finally:
        engine.stop()
        engine.join()
        engine.arena.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="auto", help="comma-separated, e.g. float16,float32")
    p.add_argument("--policies", default="semantic,lru")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--growth", type=int, default=32)
    p.add_argument("--growth-min", type=int, default=0, help="with --growth-max: tool results of random size")
    p.add_argument("--growth-max", type=int, default=0)
    p.add_argument("--arena-agents", type=float, default=0,
                   help="the host arena holds this many agents' KV (0: all of them); less forces drops")
    p.add_argument("--profile", choices=("short", "long"), default="short",
                   help=f"long: tool results of random size and a small arena, so KV is dropped too: {LONG}")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tool-s", type=float, default=0.3, help="expected_s of each tool call")
    p.add_argument("--pool-agents", type=float, default=3.0, help="the small pool holds this many agents' KV")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.profile == "long":
        p.set_defaults(**LONG)
        a = p.parse_args()
    growth = (a.growth_min, a.growth_max) if a.growth_max else a.growth
    history = history_tokens(a.turns, a.context, a.growth_max or a.growth, a.new_tokens)
    shape = lambda dtype, n: pool_mib(a.model, a.device, dtype, history, n)  # noqa: E731
    rows = []
    for dtype in a.dtypes.split(","):
        everyone = shape(dtype, a.agents)
        reference, _ = run_agents(a.model, a.device, dtype, "none", everyone, 0, a.agents, a.turns, a.context,
                                  growth, a.new_tokens, a.tool_s)
        arena = shape(dtype, a.arena_agents) if a.arena_agents else everyone
        for policy in a.policies.split(","):
            tokens, counters = run_agents(a.model, a.device, dtype, policy, shape(dtype, a.pool_agents), arena,
                                          a.agents, a.turns, a.context, growth, a.new_tokens, a.tool_s)
            differ = [(i, t) for i, agent in enumerate(tokens) for t, turn in enumerate(agent)
                      if turn != reference[i][t]]
            rows.append({"dtype": dtype, "policy": policy, "turns_differing": differ, "equal": not differ,
                         **{m: counters.get(m, 0) for m in MOVES}})
    report = {**stamp(), "args": vars(a), "rows": rows}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"\n{a.model} on {a.device}: {a.agents} agents x {a.turns} turns, one request at a time, pool for "
          f"{a.pool_agents} agents{f' and arena for {a.arena_agents}' if a.arena_agents else ''} vs one for all "
          f"(paging off); {report['date'][:10]}, commit {report['git']}, {report['gpu'] or 'no GPU'}")
    print(f"{'dtype':<9} {'policy':<9} {'equal':<6} {'differing turns':<16}" + "".join(f"{m.removeprefix('swaps_'):>18}" for m in MOVES))
    for r in rows:
        print(f"{r['dtype']:<9} {r['policy']:<9} {str(r['equal']):<6} {len(r['turns_differing']):<16}"
              + "".join(f"{r[m]:>18}" for m in MOVES))


def history_tokens(turns: int, context: int, growth: int, new_tokens: int) -> int:
    """An agent's whole history after its last turn."""
    return context + (turns - 1) * growth + turns * new_tokens


def pool_mib(model: str, device: str, dtype: str, agent_tokens: int, agents: float) -> float:
    """A KV pool that holds `agents` whole histories of `agent_tokens`, and the pool's scratch block."""
    args = model_args(model)
    per_block = bytes_per_block(args.num_layers, args.num_kv_heads, args.head_dim, BLOCK,
                                resolve_dtype(dtype, resolve_device(device)))
    return (agents * -(-agent_tokens // BLOCK) + 2) * per_block / 2**20


if __name__ == "__main__":
    main()
