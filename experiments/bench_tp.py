"""Tensor parallelism on the GPUs of one host: real daemons, measured through the socket.

    python experiments/bench_tp.py --only 8b --out experiments/results/bench_tp_8b.json        # 2 GPUs, < 4 min
    python experiments/bench_tp.py --only 70b --out experiments/results/bench_tp_70b.json      # 2 (or 4) GPUs
    python experiments/bench_tp.py --only 70b-stream --out experiments/results/bench_tp_70b_stream.json  # 1 GPU
    python experiments/bench_tp.py --only smoke --out /tmp/bench_tp_smoke.json                 # CPU: the script runs

Rows: random:llama-3.1-8b at TP 1 and TP 2; random:llama-3.1-70b (bf16) at TP 2 (and 4 where four
GPUs are visible) against weight streaming of the same model on one GPU. Per row: decode step at
batch 1 (median gap between streamed tokens), aggregate decode tok/s at batch 32 and 64, time to
the first token of a 1024-token prompt, and batch-1 decode against the aggregate weight-bandwidth
roofline (each rank's weight bytes over --hbm-gbps, the slowest rank bounding the step). Random
weights: honest for bandwidth and latency, meaningless as text. Each row runs in its own daemon;
a row that fails is recorded with its error and the next one runs.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from experiments.harness import start_daemon, stamp, stop_daemon  # noqa: E402

GiB = 2**30
VOCAB = [120000]         # prompt ids stay below this (random:tiny in the smoke run: 500)
COMMON = ["--dtype", "bfloat16", "--max-model-len", "4096", "--max-num-seqs", "64", "--host-arena-mb", "4096"]


def rows(gpus: int, only: str | None) -> list[tuple[str, list[str]]]:
    if only == "smoke":      # the script itself on CPU (gloo), not a measurement
        cpu = ["--model", "random:tiny", "--device", "cpu", "--dtype", "float32", "--max-num-seqs", "8",
               "--max-model-len", "1024", "--host-arena-mb", "64"]
        return [("tiny tp1 (cpu)", cpu), ("tiny tp2 (cpu)", cpu + ["--tensor-parallel", "2"])]
    out = []
    if only in (None, "8b"):
        out += [("8b tp1", ["--model", "random:llama-3.1-8b"]),
                ("8b tp2", ["--model", "random:llama-3.1-8b", "--tensor-parallel", "2"])]
    if only in (None, "70b"):
        out += [("70b tp2", ["--model", "random:llama-3.1-70b", "--tensor-parallel", "2"])]
        if gpus >= 4:
            out += [("70b tp4", ["--model", "random:llama-3.1-70b", "--tensor-parallel", "4"])]
    if only in (None, "70b-stream"):
        out += [("70b streamed, 1 GPU", ["--model", "random:llama-3.1-70b", "--weights-budget-mb", "110000",
                                         "--gpu-memory-utilization", "0.95"])]
    return [(name, flags) for name, flags in out if "--tensor-parallel" not in flags
            or int(flags[flags.index("--tensor-parallel") + 1]) <= gpus]


def prompt(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % VOCAB[0] + 3 for i in range(n)]


def stream_times(djinn, ids: list[int], new: int) -> list[float]:
    times = []
    for _ in djinn.session().stream(prompt_ids=ids, max_new_tokens=new, ignore_eos=True):
        times.append(time.perf_counter())
    return times


def decode_b1_step_s(sock: str, new: int = 96) -> float:
    with libdjinn.connect(sock) as djinn:
        stream_times(djinn, prompt(16, 0), 8)                 # warm-up
        times = stream_times(djinn, prompt(16, 1), new)
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps[4:])


def decode_batch_tok_s(sock: str, batch: int, new: int = 64) -> float:
    """Aggregate tokens per second once every session decodes (from the last first token to the end)."""
    results, threads = [None] * batch, []

    def one(i):
        with libdjinn.connect(sock) as djinn:
            results[i] = stream_times(djinn, prompt(16, 100 + i), new)
    for i in range(batch):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    start = max(r[0] for r in results)
    tokens = sum(sum(1 for t in r if t > start) for r in results)
    return tokens / (max(r[-1] for r in results) - start)


def ttft_s(sock: str, length: int = 1024) -> float:
    with libdjinn.connect(sock) as djinn:
        out = []
        for seed in range(3):
            start = time.perf_counter()
            djinn.session().generate(prompt_ids=prompt(length, 50 + seed), max_new_tokens=1, ignore_eos=True)
            out.append(time.perf_counter() - start)
    return statistics.median(out)


def measure(name: str, flags: list[str], hbm_gbps: float, batches=(32, 64)) -> dict:
    proc, sock = start_daemon(*COMMON, *flags)
    try:
        with libdjinn.connect(sock) as djinn:
            status = djinn.status()
        tp = status.get("tensor_parallel")
        per_rank = max(r["weights_bytes"] for r in tp["ranks"]) if tp else status["memory"]["weights_bytes"]
        stream = status.get("weight_streaming")
        row = {"name": name, "flags": flags, "ranks": tp["world"] if tp else 1, "weights_bytes_per_rank": per_rank,
               "streamed": bool(stream)}
        row["decode_b1_step_ms"] = decode_b1_step_s(sock) * 1e3
        row["decode_b1_tok_s"] = 1e3 / row["decode_b1_step_ms"]
        roofline_ms = per_rank / (hbm_gbps * 1e9) * 1e3
        row["roofline_b1_step_ms"] = roofline_ms
        row["b1_of_roofline"] = roofline_ms / row["decode_b1_step_ms"] if not stream else None
        for b in batches:
            row[f"decode_b{b}_tok_s"] = decode_batch_tok_s(sock, b)
        row["ttft_1024_s"] = ttft_s(sock, 1024 if batches == (32, 64) else 256)
        return row
    finally:
        stop_daemon(proc)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--only", choices=["8b", "70b", "70b-stream", "smoke"])
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="per-GPU memory bandwidth (H200: 4.8 TB/s)")
    args = p.parse_args()
    import torch
    gpus = torch.cuda.device_count()
    report = {**stamp(), "gpus": gpus, "hbm_gbps": args.hbm_gbps, "rows": []}
    if gpus < 2:
        report["note"] = f"{gpus} GPU(s) visible: tensor-parallel rows need 2 or more"
    if args.only == "smoke":
        gpus, VOCAB[0] = 2, 500
    for name, flags in rows(gpus, args.only):
        started = time.perf_counter()
        try:
            row = measure(name, flags, args.hbm_gbps, (2, 4) if args.only == "smoke" else (32, 64))
        except Exception as e:          # one failing row must not cost the others
            row = {"name": name, "flags": flags, "error": f"{type(e).__name__}: {e}"}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        report["rows"].append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"{'row':<22} {'b1 ms':>8} {'of roof':>8} {'b32 tok/s':>10} {'b64 tok/s':>10} {'ttft1024':>9}"
          + ("   (smoke: b2, b4, ttft of 256)" if args.only == "smoke" else ""))
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['name']:<22} ERROR {r['error'][:90]}")
            continue
        roof = f"{r['b1_of_roofline']:.0%}" if r["b1_of_roofline"] is not None else "-"
        small, large = [r[k] for k in r if k.startswith("decode_b") and k.endswith("_tok_s") and k != "decode_b1_tok_s"]
        print(f"{r['name']:<22} {r['decode_b1_step_ms']:8.2f} {roof:>8} {small:10.0f} {large:10.0f} {r['ttft_1024_s']:9.3f}")


if __name__ == "__main__":
    main()
