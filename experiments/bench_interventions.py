"""Interventions at serving speed, with their baselines in the same run, through a real djinnd:

- decode tok/s at batch 1 and 32, unsteered vs steered at 2 layers (each session its own vectors);
- decode tok/s at batch 32 with one layer captured by every session vs none;
- the other 31 sessions' decode tok/s alone, while one session holds a pause at a breakpoint, and
  while one session traces with a breakpoint at every forward and resumes at once;
- harvest of one layer's outputs (tok/s; warmed up with calls of the measured shape) vs, in this
  process after the daemon stops, the prefill token rate of our forward truncated at that layer (at
  the call's batch and at the daemon's harvest sub-batch: the better is the bar) and HF transformers
  forward hooks on the same prompts (a hook that copies the layer's output to the host; full forward,
  and stopped there), each baseline over --baseline-tokens.

Decode figures: the median of --rounds rounds, and every round's rate in the JSON ("rounds"); the
table ends with each round's steered/plain ratio, so the noise is in sight.

    python experiments/bench_interventions.py --model random:llama-3.1-8b --device cuda --out r.json
    python experiments/bench_interventions.py --model random:tiny --device cpu --new-tokens 16 --harvest-tokens 8192

Random presets: real shapes, meaningless text. Rates of several rounds, alternating the variants.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from experiments.harness import start_daemon, stamp, stop_daemon  # noqa: E402


def prompts_of(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


class Fleet:
    """n sessions on a few connections (a process may hold 64), a thread each; run() starts their
    generates together."""

    def __init__(self, sock: str, n: int):
        self.conns = [libdjinn.connect(sock) for _ in range(min(n, 8))]
        self.sessions = [self.conns[i % len(self.conns)].session() for i in range(n)]

    def run(self, jobs: list[dict]) -> tuple[float, int]:
        """jobs[i]: generate kwargs of session i; returns (wall seconds, tokens generated)."""
        out, barrier = [0] * len(jobs), threading.Barrier(len(jobs) + 1)

        def one(i):
            barrier.wait()
            out[i] = len(self.sessions[i].generate(**jobs[i]).tokens)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        return time.perf_counter() - started, sum(out)

    def close(self):
        for c in self.conns:
            c.close()


def decode_rates(sock, a, n, variants: dict, vocab: int) -> dict:
    """tok/s per variant, variants alternating within each round: name -> fn(i) -> extra kwargs.
    Returns {name: median} and {"rounds": {name: [tok/s of each round]}}."""
    fleet, rates = Fleet(sock, n), {name: [] for name in variants}
    prompts = prompts_of(n, a.prompt_tokens, vocab, seed=n)
    try:
        for r in range(a.rounds + 1):               # round 0 warms up (graphs, allocator)
            for name, extra in variants.items():
                wall, tokens = fleet.run([dict(prompt_ids=prompts[i], max_new_tokens=a.new_tokens, ignore_eos=True,
                                               keep_tokens=0, **extra(i)) for i in range(n)])
                if r:
                    rates[name].append(tokens / wall)
    finally:
        fleet.close()
    return medians(rates)


def medians(rates: dict) -> dict:
    return {**{name: statistics.median(v) for name, v in rates.items()}, "rounds": rates}


def steering(layers: list[int], hidden: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"steer": {layer: torch.randn(hidden, generator=g) * 0.1 for layer in layers}}


def paused_neighbour(sock, a, n: int, layer: int, vocab: int) -> dict:
    """The other n - 1 sessions' tok/s alone, beside one held pause, beside one tracing at every forward."""
    fleet, rates = Fleet(sock, n - 1), {"alone": [], "one_paused": [], "one_tracing": []}
    prompts = prompts_of(n, a.prompt_tokens, vocab, seed=7)
    jobs = [dict(prompt_ids=p, max_new_tokens=a.new_tokens, ignore_eos=True, keep_tokens=0) for p in prompts[1:]]
    with libdjinn.connect(sock) as own:
        tracer = own.session()
        try:
            for r in range(a.rounds + 1):
                rates_now = {"alone": fleet.run(jobs)}
                trace = iter(tracer.trace(prompt_ids=prompts[0], breakpoints=[layer], steps=[1], keep_tokens=0,
                                          max_new_tokens=4, ignore_eos=True))
                held = next(trace)                      # paused in its first decode step, held
                rates_now["one_paused"] = fleet.run(jobs)
                held.resume()
                list(trace)
                done = threading.Event()
                tracing = threading.Thread(target=_trace_until, args=(tracer, prompts[0], layer, done))
                tracing.start()
                rates_now["one_tracing"] = fleet.run(jobs)
                done.set()
                tracing.join()
                if r:
                    for name, (wall, tokens) in rates_now.items():
                        rates[name].append(tokens / wall)
        finally:
            fleet.close()
    return medians(rates)


def _trace_until(session, prompt, layer, done):
    while not done.is_set():
        for _ in session.trace(prompt_ids=prompt, breakpoints=[layer], steps="all", max_new_tokens=32,
                               ignore_eos=True, keep_tokens=0):
            if done.is_set():
                break


def harvest_rate(sock, a, layer: int, vocab: int) -> dict:
    prompts = prompts_of(a.harvest_tokens // a.harvest_prompt_tokens, a.harvest_prompt_tokens, vocab, seed=3)
    with libdjinn.connect(sock) as djinn:
        for _ in range(2):          # warm-up with calls of the measured shape (kernels compiled, buffers made)
            djinn.harvest(prompts[:a.harvest_batch], layers=[layer])
        calls, checksum = [], 0.0
        started = time.perf_counter()
        for i in range(0, len(prompts), a.harvest_batch):
            t = time.perf_counter()
            h = djinn.harvest(prompts[i:i + a.harvest_batch], layers=[layer])
            checksum += float(h[layer][-1, 0])           # read: the rows are there
            calls.append(time.perf_counter() - t)
        wall = time.perf_counter() - started
        max_call_tokens = djinn.request("model_config")["max_harvest_tokens"]
    tokens = len(prompts) * a.harvest_prompt_tokens
    return {"tokens": tokens, "tok_per_s": tokens / wall, "calls": len(calls),
            "call_ms_median": statistics.median(calls) * 1e3, "call_ms_max": max(calls) * 1e3,
            "daemon_max_harvest_tokens": max_call_tokens}


# ---- in-process baselines (after the daemon stops) --------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def truncated_prefill_rate(model, a, layer: int, dtype, device, prompts, batch_size: int) -> float:
    """Our prefill forward over batches of batch_size prompts, cut after `layer`, outputs left on the device."""
    from djinnd.engine.runner import Runner
    from djinnd.memory.block_pool import KVBlockPool
    from djinnd.session import Session
    args, batch = model.args, prompts[:batch_size]
    tokens = sum(map(len, batch))
    per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.empty((), dtype=dtype).element_size()
    budget = (tokens + 64 * 16) * per_token
    pool = KVBlockPool(args.num_layers, args.num_kv_heads, args.head_dim, 16, budget, dtype, device)
    runner = Runner(model, pool, device, 1, max(map(len, batch)), cuda_graphs=False)
    sessions = [Session(0, 0, 0, tokens=list(p), block_table=pool.allocate(pool.blocks_for(len(p)))) for p in batch]
    chunks = [(s, len(s.tokens)) for s in sessions]
    runner.forward(chunks, 0, layer + 1)
    sync(device)
    rounds = max(1, len(prompts) // batch_size)
    started = time.perf_counter()
    for _ in range(rounds):
        runner.forward(chunks, 0, layer + 1)
    sync(device)
    return rounds * tokens / (time.perf_counter() - started)


class StopForward(Exception):
    pass


def hf_hook_rates(model, a, layer: int, device, prompts) -> dict:
    """HF transformers with a forward hook copying layer `layer`'s output to the host: full forward,
    and stopped there by raising from the hook (as nnsight does for early exit)."""
    from experiments.bench_decode import hf_model
    hf, out = hf_model(model), {}
    ids = torch.tensor(prompts[:a.harvest_batch], device=device)       # prompts: at most --baseline-tokens
    rounds = max(1, len(prompts) // a.harvest_batch)
    for stop in (False, True):
        def hook(module, args, output, stop=stop):
            h = output[0] if isinstance(output, tuple) else output
            hook.kept = h.to("cpu")
            if stop:
                raise StopForward
        handle = hf.model.layers[layer].register_forward_hook(hook)
        try:
            for r in range(rounds + 1):
                if r == 1:
                    sync(device)
                    started = time.perf_counter()
                try:
                    with torch.no_grad():
                        hf(ids, use_cache=False, logits_to_keep=1)
                except StopForward:
                    pass
            sync(device)
            out["hf_hook_stopped" if stop else "hf_hook_full"] = rounds * ids.numel() / (time.perf_counter() - started)
        finally:
            handle.remove()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA (the daemon's rule)")
    p.add_argument("--kv-cache-mb", type=int, default=16384)
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16, help="short: decode dominates the wall time")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4, help="measured rounds, after one warm-up round")
    p.add_argument("--layer", type=int, default=16, help="capture, harvest and breakpoint layer")
    p.add_argument("--harvest-tokens", type=int, default=1 << 20)
    p.add_argument("--baseline-tokens", type=int, default=1 << 18,
                   help="tokens of each in-process baseline (truncated prefill, HF hooks): a steady rate is enough")
    p.add_argument("--harvest-prompt-tokens", type=int, default=512)
    p.add_argument("--harvest-batch", type=int, default=16, help="prompts per harvest call (and baseline batch)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--out", default="experiments/results/bench_interventions.json")
    a = p.parse_args()
    if a.dtype == "auto":
        a.dtype = "float32" if a.device == "cpu" else "bfloat16"
    from djinnd.model.loader import model_args
    args = model_args(a.model)
    layer = min(a.layer, args.num_layers - 1)
    steer_layers = sorted({args.num_layers // 4, layer})
    batched = max(a.harvest_batch * a.harvest_prompt_tokens, 2048)        # one harvest call's tokens
    proc, sock = start_daemon("--model", a.model, "--device", a.device, "--dtype", a.dtype, "--kv-cache-mb",
                              str(a.kv_cache_mb), "--max-num-seqs", str(max(a.sessions, 8)),
                              "--max-num-batched-tokens", str(batched))
    from djinnd.engine.harvest import sub_batch_tokens
    report = {**stamp(), "model": a.model, "device": a.device, "dtype": a.dtype, "args": vars(a),
              "steer_layers": steer_layers, "layer": layer,
              "daemon": {"max_num_batched_tokens": batched, "max_num_seqs": max(a.sessions, 8),
                         "kv_cache_mb": a.kv_cache_mb, "harvest_sub_batch_tokens": sub_batch_tokens(batched)}}
    try:
        hidden = args.hidden_size
        plain, steered = (lambda i: {}), (lambda i: steering(steer_layers, hidden, seed=i))
        report["b1"] = decode_rates(sock, a, 1, {"plain": plain, "steered": steered}, args.vocab_size)
        report["b32"] = decode_rates(sock, a, a.sessions, {"plain": plain, "steered": steered,
                                                           "captured": lambda i: {"capture": [layer]}},
                                     args.vocab_size)
        report["breakpoint"] = paused_neighbour(sock, a, a.sessions, layer, args.vocab_size)
        report["harvest"] = harvest_rate(sock, a, layer, args.vocab_size)
    finally:
        stop_daemon(proc)
    save(report, a.out)                  # the daemon's figures are kept whatever the baselines do
    report.update(baselines(a, layer, report["daemon"]["harvest_sub_batch_tokens"]))
    write(report, a.out)


def baselines(a, layer: int, sub_batch_tokens: int) -> dict:
    """Truncated prefill at the harvest call's batch and at the daemon's sub-batch (the better rate is the
    bar), then HF hooks at the call's batch."""
    from djinnd.model.loader import load_model
    dtype = getattr(torch, a.dtype)
    model = load_model(a.model, 0, dtype, a.device).model
    prompts = prompts_of(min(a.harvest_tokens, a.baseline_tokens) // a.harvest_prompt_tokens,
                         a.harvest_prompt_tokens, model.args.vocab_size, seed=3)
    sub = max(1, sub_batch_tokens // a.harvest_prompt_tokens)
    by_batch = {n: truncated_prefill_rate(model, a, layer, dtype, a.device, prompts, n) for n in {a.harvest_batch, sub}}
    out = {"truncated_prefill_tok_per_s": max(by_batch.values()),     # the better of the two is the bar
           "truncated_prefill_by_batch_prompts": by_batch}
    if not a.no_hf:
        try:
            out.update(hf_hook_rates(model, a, layer, a.device, prompts))
        except Exception as e:           # an HF version quirk must not cost the run's other figures
            out["hf_error"] = f"{type(e).__name__}: {e}"
            print(f"HF baseline failed: {out['hf_error']}", file=sys.stderr)
    return out


def save(r: dict, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(r, fh, indent=1)


def write(r: dict, path: str):
    save(r, path)
    b1, b32, bp, hv = r["b1"], r["b32"], r["breakpoint"], r["harvest"]
    print(f"\n{r['model']} (RANDOM WEIGHTS) on {r['gpu'] or 'cpu'}, {r['dtype']}, {r['date']}, git {r['git']}")
    print(f"{'measure':<52} {'tok/s':>10} {'vs baseline':>12}")
    rows = [("b1 decode, unsteered", b1["plain"], None),
            (f"b1 decode, steered at layers {r['steer_layers']}", b1["steered"], b1["plain"]),
            (f"b{r['args']['sessions']} decode, unsteered", b32["plain"], None),
            ("  steered, each session its own vectors", b32["steered"], b32["plain"]),
            (f"  capture of layer {r['layer']} by every session", b32["captured"], b32["plain"]),
            (f"b{r['args']['sessions'] - 1} decode alone", bp["alone"], None),
            ("  beside one session held at a breakpoint", bp["one_paused"], bp["alone"]),
            ("  beside one tracing at every forward", bp["one_tracing"], bp["alone"]),
            (f"harvest of layer {r['layer']} ({hv['tokens']:,} tokens)", hv["tok_per_s"],
             r["truncated_prefill_tok_per_s"]),
            (f"  prefill forward cut at layer {r['layer']} (baseline)", r["truncated_prefill_tok_per_s"], None)]
    for key in ("hf_hook_full", "hf_hook_stopped"):
        if key in r:
            rows.append((f"  HF forward hook, {key.split('_')[-1]} forward", r[key], None))
            rows.append((f"  harvest vs HF hook, {key.split('_')[-1]}", hv["tok_per_s"], r[key]))
    for name, value, base in rows:
        ratio = f"{value / base * 100:.1f}%" if base else ""
        print(f"{name:<52} {value:>10,.0f} {ratio:>12}")
    print(f"harvest: {hv['calls']} calls of {r['args']['harvest_batch']} prompts, {hv['call_ms_median']:.0f} ms median "
          f"(max {hv['call_ms_max']:.0f}), sub-batches of {r['daemon']['harvest_sub_batch_tokens']} tokens; "
          "truncated prefill by prompts a batch: " + ", ".join(f"{n}: {v:,.0f} tok/s" for n, v in
                                                             r["truncated_prefill_by_batch_prompts"].items()))
    for name, rates, variant in (("b1", b1, "steered"), (f"b{r['args']['sessions']}", b32, "steered"),
                                 (f"b{r['args']['sessions']}", b32, "captured")):
        paired = [v / p * 100 for v, p in zip(rates["rounds"][variant], rates["rounds"]["plain"])]
        print(f"{name} {variant} vs plain, each round: {', '.join(f'{x:.1f}%' for x in paired)} "
              f"(overhead of the medians {100 - rates[variant] / rates['plain'] * 100:+.1f}%)")


if __name__ == "__main__":
    main()
