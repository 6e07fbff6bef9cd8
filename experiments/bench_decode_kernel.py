"""The paged decode kernel alone (triton_attention.py), bf16 against fp8 KV, over its launch
settings: tile width (block_n), split count and warps. Each case times the kernel on a ragged-free
batch of B sessions at C tokens of context in Llama-3.1-8B's attention shape (32 query heads, 8 KV
heads, head_dim 128) and reports the KV bytes it reads per second against the HBM copy rate
measured in the same run. CUDA only.

    python experiments/bench_decode_kernel.py --cases 1x1024,1x32768,32x8192 --out r.json
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.model import triton_attention  # noqa: E402
from experiments.bench_decode import hbm_bandwidth  # noqa: E402
from experiments.harness import stamp  # noqa: E402


def time_ms(fn, iters: int = 30) -> float:
    """Median of CUDA-graph replays: launch overhead out, as in the engine's decode graphs."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def case(batch: int, context: int, kv_dtype, a) -> list[dict]:
    heads, kv_heads, dim, block_size = a.heads, a.kv_heads, a.head_dim, 16
    blocks = batch * (-(-context // block_size))
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(blocks + 1, block_size, kv_heads, dim, device="cuda", generator=gen).to(kv_dtype)
    v = torch.randn(blocks + 1, block_size, kv_heads, dim, device="cuda", generator=gen).to(kv_dtype)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    tables = torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32).view(batch, -1)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * batch * context * kv_heads * dim * k.element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for block_n in a.block_n:
        base = triton_attention.num_splits_for(batch, kv_heads, a.max_context, sms, block_n)
        for splits in sorted({max(1, base * m // 2) for m in a.split_mult}):
            for warps, stages in itertools.product(a.warps, a.stages):
                run = lambda: triton_attention.paged_decode_attention(  # noqa: E731
                    q, k, v, tables, lens, splits, block_n, num_warps=warps, num_stages=stages)
                setting = {"block_n": block_n, "splits": splits, "warps": warps, "stages": stages}
                try:
                    ms = time_ms(run)
                except Exception as e:          # a setting Triton cannot compile: say so, keep the rest
                    rows.append({**setting, "error": str(e)[:200]})
                    continue
                rows.append({**setting, "default_splits": base, "ms": ms, "kv_gb_per_s": kv_bytes / ms / 1e6})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1x1024,1x32768,32x8192", help="BATCHxCONTEXT, comma-separated")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--split-mult", default="1,2,4", help="split count x this / 2 (2: the engine's choice)")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="3", help="software pipeline stages (3: Triton's default, the engine's)")
    p.add_argument("--max-context", type=int, default=131072, help="what the engine sizes splits for")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default="experiments/results/bench_decode_kernel.json")
    a = p.parse_args()
    a.block_n, a.split_mult, a.warps, a.stages = ([int(x) for x in s.split(",")]
                                                  for s in (a.block_n, a.split_mult, a.warps, a.stages))
    bw = hbm_bandwidth("cuda")
    report = {**stamp(), "hbm_gb_per_s": bw / 1e9, "args": {k: v for k, v in vars(a).items()}, "cases": {}}
    for spec in a.cases.split(","):
        batch, context = (int(x) for x in spec.split("x"))
        for name, dtype in (("bf16", torch.bfloat16), ("fp8_e4m3", torch.float8_e4m3fn)):
            report["cases"][f"{spec} {name}"] = case(batch, context, dtype, a)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"\npaged decode kernel on {report['gpu']}, {report['date']}, HBM {bw / 1e9:,.0f} GB/s (copy)")
    print(f"{'case':<18} {'engine setting':>24} {'GB/s':>7} {'best setting':>24} {'GB/s':>7}")
    for name, rows in report["cases"].items():
        ok = [r for r in rows if "ms" in r]
        if not ok:
            continue
        batch = int(name.split("x")[0])
        tile = triton_attention.tile_for(1 if "fp8" in name else 2, batch)
        engine = [r for r in ok if r["block_n"] == tile and r["splits"] == r["default_splits"] and r["warps"] == 4
                  and r["stages"] == 3]
        best = max(ok, key=lambda r: r["kv_gb_per_s"])
        label = lambda r: f"n{r['block_n']} s{r['splits']} w{r['warps']} p{r['stages']}"  # noqa: E731
        e = engine[0] if engine else None
        print(f"{name:<18} {label(e) if e else '-':>24} {e['kv_gb_per_s'] if e else 0:>7,.0f} {label(best):>24} "
              f"{best['kv_gb_per_s']:>7,.0f}")


if __name__ == "__main__":
    main()
