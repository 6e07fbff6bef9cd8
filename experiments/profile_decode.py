"""Where a decode step's time goes: the engine decodes B sessions at C tokens of context under the
torch profiler, and the GPU kernels are summed by name per step (the decode graph's kernels where
the profiler sees inside replays, else an eager engine's). Beside it, each linear layer's matmul
alone at M = B rows (L2 flushed before each run) against the HBM copy rate measured in the same run.
CUDA only; random presets are seeded random weights in real shapes.

    python experiments/profile_decode.py --model random:llama-3.1-8b --context 1024 --batch 1
"""
import argparse
import collections
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from experiments.bench_decode import hbm_bandwidth, random_tokens  # noqa: E402
from experiments.harness import stamp  # noqa: E402


def kernels_per_step(a, overrides: dict) -> dict:
    """{kernel name: (microseconds per step, launches per step)} over a.steps decode steps; the
    prompts are fed before the profiler starts."""
    engine = build_engine(load_config(None, {"model": a.model, "device": "cuda", "max_num_seqs": a.batch,
                                             "kv_cache_mb": a.kv_cache_mb, "prefix_sharing": "off", **overrides}))
    engine.start()
    client = LocalClient(engine)
    vocab = engine.loaded.model.args.vocab_size
    for salt in (0, 1):                                           # the first pass warms up: compiles, graphs
        prompts = random_tokens(a.batch, a.context, vocab, salt=salt).tolist()
        sessions = [client.open() for _ in prompts]
        for e in [client.submit(s, p[:-1], 1) for s, p in zip(sessions, prompts)]:
            client.done(e)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        with profiler if salt else contextlib.nullcontext():
            for e in [client.submit(s, p[-1:], a.steps) for s, p in zip(sessions, prompts)]:
                client.done(e)
        for s in sessions:
            client.close(s)
    engine.stop()
    engine.join()
    return kernel_sums(profiler, a.steps)


def kernel_sums(profiler, steps: int) -> dict:
    """{kernel name: [microseconds per step, launches per step]} of a finished profile."""
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in profiler.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower():
            totals[e.name][0] += e.device_time / steps
            totals[e.name][1] += 1 / steps
    return dict(totals)


def linear_rates(model, batch: int, bw: float) -> list[dict]:
    """Each distinct weight shape's matmul at `batch` rows alone: ms and share of the HBM copy rate."""
    shapes = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name:
            shapes.setdefault(tuple(p.shape), (name.split(".")[-2], p))
    out = []
    for shape, (name, w) in shapes.items():
        x = torch.randn(batch, shape[1], device=w.device, dtype=w.dtype)
        ms = cold_ms(lambda: F.linear(x, w))
        out.append({"layer": name, "shape": list(shape), "ms": ms,
                    "share_of_hbm": w.numel() * w.element_size() / (ms / 1e3) / bw})
    return out


def cold_ms(fn, reps: int = 15) -> float:
    """Median time of fn, each run after a 256 MB write (L2 holds none of its inputs, as in a forward
    over all the weights) and enqueued behind it (no launch gap inside the timing)."""
    fn()
    flush = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--kv-cache-mb", type=float, default=16384)
    p.add_argument("--out", default="experiments/results/profile_decode.json")
    a = p.parse_args()
    bw = hbm_bandwidth("cuda")
    report = {**stamp(), "args": vars(a), "hbm_bytes_per_s": bw}
    report["graphs"] = kernels_per_step(a, {})
    if len(report["graphs"]) < 5:       # the profiler saw only the replays: list an eager step's kernels
        report["eager"] = kernels_per_step(a, {"cuda_graphs": False})
    engine = build_engine(load_config(None, {"model": a.model, "device": "cuda", "kv_cache_mb": 64}))
    report["linear"] = linear_rates(engine.loaded.model, a.batch, bw)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    for kind in ("graphs", "eager"):
        if kind not in report:
            continue
        rows = sorted(report[kind].items(), key=lambda kv: -kv[1][0])
        total = sum(us for us, _ in report[kind].values())
        launches = sum(n for _, n in report[kind].values())
        print(f"\n{kind}: {total:.0f} us of kernels, {launches:.0f} launches per step "
              f"(b{a.batch}, context {a.context})")
        for name, (us, n) in rows[:a.top]:
            print(f"  {us:8.1f} us {n:6.0f}x  {name[:90]}")
    print(f"\nlinear layers alone at M={a.batch} (HBM copy {bw / 1e9:.0f} GB/s):")
    for r in report["linear"]:
        print(f"  {r['layer']:<14} {str(r['shape']):<16} {r['ms'] * 1e3:8.1f} us  {100 * r['share_of_hbm']:5.1f}%")


if __name__ == "__main__":
    main()
