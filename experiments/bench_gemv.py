"""Decode's matrix-vector products as the step runs them: a chain of one linear per layer over 32
distinct weights (so nothing stays in L2), captured in a CUDA graph, for each of Llama-3.1-8B's
weight shapes, in several formulations: F.linear on [out, in] weights (the engine's), a matmul
on the transposed copy [in, out], torch.mv, the reduction split in 2 or 4 slices (a strided
batched product and a sum), the engine's Triton GEMV at one row (triton_gemv.py, launched with PDL
as in the engine), and cuBLASLt instead of cuBLAS. Reports the weight
bytes read per second against the HBM copy rate measured in the same run. CUDA only.

    python experiments/bench_gemv.py --rows 1,32 --out r.json
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.bench_decode import hbm_bandwidth  # noqa: E402
from experiments.bench_decode_kernel import time_ms  # noqa: E402
from experiments.harness import stamp  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def formulations(weights, x):
    """name -> a callable running one product per weight, in order."""
    outs = [None] * len(weights)
    transposed = [w.t().contiguous() for w in weights]

    def linear():
        for i, w in enumerate(weights):
            outs[i] = F.linear(x, w)

    def matmul_t():
        for i, w in enumerate(transposed):
            outs[i] = x @ w

    def mv():
        for i, w in enumerate(weights):
            outs[i] = torch.mv(w, x[0])

    def ksplit(parts: int):
        """The reduction split in `parts` slices as one strided batched product, then summed: more
        thread blocks than the [out, in] product's output tiles alone give cuBLAS."""
        xs = x.view(x.shape[0], parts, -1).transpose(0, 1)                       # [parts, rows, in/parts]
        ws = [w.view(w.shape[0], parts, -1).permute(1, 2, 0) for w in weights]   # [parts, in/parts, out]

        def run():
            for i, w in enumerate(ws):
                outs[i] = torch.bmm(xs, w).sum(0)
        return run

    def gemv_triton():
        from djinnd.model import triton_gemv
        for i, w in enumerate(weights):
            outs[i] = triton_gemv.linear(x, w)

    found = {"linear": linear, "matmul_t": matmul_t, "ksplit2": ksplit(2), "ksplit4": ksplit(4)}
    if x.shape[0] == 1:
        found["mv"] = mv
        found["triton"] = gemv_triton
    return found, transposed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,32")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default="experiments/results/bench_gemv.json")
    a = p.parse_args()
    bw = hbm_bandwidth("cuda")
    report = {**stamp(), "hbm_gb_per_s": bw / 1e9, "layers": a.layers, "cases": []}
    for name, (out_f, in_f) in SHAPES.items():
        weights = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(a.layers)]
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
            found, transposed = formulations(weights, x)
            for backend in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(backend)
                for form, fn in found.items():
                    ms = time_ms(fn, iters=20)
                    gbs = a.layers * out_f * in_f * 2 / ms / 1e6
                    report["cases"].append({"weight": name, "rows": rows, "form": form, "blas": backend,
                                            "us_per_layer": 1e3 * ms / a.layers, "gb_per_s": gbs,
                                            "share_of_hbm": gbs * 1e9 / bw})
            torch.backends.cuda.preferred_blas_library("cublas")
            del transposed
        del weights
        torch.cuda.empty_cache()
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"\nGEMV chains ({a.layers} weights) on {report['gpu']}, {report['date']}, HBM {bw / 1e9:,.0f} GB/s")
    print(f"{'weight':<8} {'rows':>4} {'form':<9} {'blas':<9} {'us/layer':>9} {'share':>6}")
    for r in report["cases"]:
        print(f"{r['weight']:<8} {r['rows']:>4} {r['form']:<9} {r['blas']:<9} {r['us_per_layer']:>9.1f} "
              f"{r['share_of_hbm']:>6.0%}")


if __name__ == "__main__":
    main()
