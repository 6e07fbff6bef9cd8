"""Prefill attention after a cached prefix, one layer: the torch path (gather each session's blocks,
then FlashAttention-2) against the Triton paged prefill kernel (triton_prefill.py) reading the block
table in place, over its launch settings (warps, stages). Llama-3.1-8B's attention shape (32 query
heads, 8 KV heads, head_dim 128), bf16, random data. Reports ms per layer and attention TFLOP/s
(4 x chunk x visible keys x heads x head_dim, causal). CUDA only.

    python experiments/bench_prefill_kernel.py --cases 32@16384,512@16384,2048@30720,256@8192x4
"""
import argparse
import dataclasses
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.model import triton_prefill  # noqa: E402
from djinnd.model.attention import build_prefill_metadata, prefill_attention  # noqa: E402
from experiments.harness import stamp  # noqa: E402


def time_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def case(chunk: int, prefix: int, sessions: int, a) -> dict:
    heads, kv_heads, dim, block_size = a.heads, a.kv_heads, a.head_dim, 16
    ctx = prefix + chunk
    per = -(-ctx // block_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(sessions * per + 1, block_size, kv_heads, dim, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(sessions * per, device="cuda", generator=gen).tolist()
    tables = [order[i * per:(i + 1) * per] for i in range(sessions)]
    meta = build_prefill_metadata([chunk] * sessions, [ctx] * sessions, tables, block_size, "cuda")
    q = torch.randn(sessions * chunk, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(sessions * chunk, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    flop = 4 * sessions * chunk * (prefix + (chunk + 1) / 2) * heads * dim
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    group = heads // kv_heads
    tiles = triton_prefill.plan(meta.query_lens, meta.context_lens, group, kv_heads, 2, "cuda", sms)
    row = {"chunk": chunk, "prefix": prefix, "sessions": sessions, "splits": tiles.num_splits,
           "torch_ms": time_ms(lambda: prefill_attention(q, k, v, k_cache, v_cache, meta)), "kernel": []}
    row["torch_tflops"] = flop / row["torch_ms"] / 1e9
    for tile, splits, warps, stages in itertools.product(a.tiles, a.splits, a.warps, a.stages):
        t = triton_prefill.plan(meta.query_lens, meta.context_lens, group, kv_heads, 2, "cuda", sms, tile)
        t = dataclasses.replace(t, num_splits=splits or t.num_splits)
        run = lambda: triton_prefill.paged_prefill_attention(  # noqa: E731
            q, k_cache, v_cache, meta.block_tables, t, num_warps=warps, num_stages=stages)
        setting = {"tile": f"{t.rows}x{t.block_n}", "splits": t.num_splits, "warps": warps, "stages": stages}
        try:
            ms = time_ms(run)
        except Exception as e:          # a setting Triton cannot compile: say so, keep the rest
            row["kernel"].append({**setting, "error": str(e)[:200]})
            continue
        row["kernel"].append({**setting, "ms": ms, "tflops": flop / ms / 1e9})
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="32@16384,128@16384,512@16384,1024@8192,2048@30720,256@8192x4",
                   help="CHUNK@PREFIX[xSESSIONS], comma-separated")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--splits", default="0", help="key slices per tile (0: the engine's choice)")
    p.add_argument("--tiles", default="", help="ROWSxBLOCK_N query rows and keys per program (none: the engine's)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default="experiments/results/bench_prefill_kernel.json")
    a = p.parse_args()
    a.warps, a.stages, a.splits = ([int(x) for x in s.split(",")] for s in (a.warps, a.stages, a.splits))
    a.tiles = [tuple(int(x) for x in t.split("x")) for t in a.tiles.split(",")] if a.tiles else [None]
    report = {**stamp(), "args": vars(a), "cases": []}
    for spec in a.cases.split(","):
        chunk, rest = spec.split("@")
        prefix, _, sessions = rest.partition("x")
        report["cases"].append(case(int(chunk), int(prefix), int(sessions or 1), a))
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"\nprefill attention after a prefix, one layer, bf16, on {report['gpu']}, {report['date']}")
    print(f"{'chunk@prefix x sessions':<24} {'gather+FA2 ms':>13} {'TFLOP/s':>8} {'kernel ms':>10} {'TFLOP/s':>8} "
          f"{'best setting':>18} {'engine splits':>6}")
    for r in report["cases"]:
        ok = [k for k in r["kernel"] if "ms" in k]
        best = min(ok, key=lambda k: k["ms"]) if ok else {"ms": float("nan"), "tflops": 0, "warps": 0, "stages": 0}
        print(f"{r['chunk']}@{r['prefix']} x{r['sessions']:<10} {r['torch_ms']:>13.3f} {r['torch_tflops']:>8.0f} "
              f"{best['ms']:>10.3f} {best['tflops']:>8.0f} {_setting(best):>18} "
              f"{r['splits']:>6}")


def _setting(k: dict) -> str:
    return f"{k['tile']} s{k['splits']} w{k['warps']} p{k['stages']}" if "tile" in k else "-"


if __name__ == "__main__":
    main()
