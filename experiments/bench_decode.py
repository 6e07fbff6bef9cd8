"""Decode tok/s at several batch sizes and prefill time: djinnd's engine (CUDA graphs + paged kernel),
the same engine eager, HF transformers `generate` on the same weights, and the HBM roofline measured
in the same run (CUDA events, before any engine thread starts). Optionally the same batch through
the socket: N real agent processes streaming at once from a real daemon.

    python experiments/bench_decode.py --model random:llama-2-7b --batches 1,32,64 --socket-agents 32

Random presets are seeded random weights in real shapes: honest for speed and memory, not text.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from djinnd.model.llama import hf_state_dict  # noqa: E402
from experiments.harness import start_daemon, stamp, stop_daemon  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hbm_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy, timed with CUDA events."""
    if torch.device(device).type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)


def engine_prefill_ms(client, prompt, repeats) -> float:
    """Time to the first token of a fresh session's prompt: one prefill and one sample."""
    times = []
    for _ in range(repeats):
        session = client.open()
        start = time.perf_counter()
        client.done(client.submit(session, prompt, 1))
        times.append(time.perf_counter() - start)
        client.close(session)
    return 1e3 * statistics.median(times)


def decode_rate(token_times: list[list[float]]) -> float:
    """Tokens per second once every session has its first token, up to the last token."""
    start = max(t[0] for t in token_times)
    end = max(t[-1] for t in token_times)
    return sum(len([x for x in t if x > start]) for t in token_times) / (end - start)


def engine_decode_tps(client, prompts, new_tokens) -> float:
    sessions = [client.open() for _ in prompts]
    pending = [client.submit(s, p, new_tokens) for s, p in zip(sessions, prompts)]
    times = [client.done(e)[1] for e in pending]
    for s in sessions:
        client.close(s)
    return decode_rate(times)


def hf_model(model):
    """The family's transformers class (Llama, Qwen2, Qwen3, Mistral) sharing our weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.args.to_hf()))
    hf.load_state_dict(hf_state_dict(model), strict=False, assign=True)   # shares our weights' memory
    hf.tie_weights()
    # the rotary table is a buffer computed at construction: build it again on the real device
    with torch.device(model.lm_head.weight.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.eval()


def hf_generate_s(hf, ids, new_tokens) -> float:
    mask = torch.ones_like(ids)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
    return time.perf_counter() - start


def hf_decode_tps(hf, ids, new_tokens) -> float:
    hf_generate_s(hf, ids, 2)    # warm-up
    return ids.shape[0] * (new_tokens - 1) / (hf_generate_s(hf, ids, new_tokens) - hf_generate_s(hf, ids, 1))


def measure_engine(a, prompts, long_prompt, batches, overrides) -> tuple[dict, object]:
    engine = build_engine(load_config(None, {"model": a.model, "device": a.device, "kv_cache_mb": a.kv_cache_mb,
                                             "max_num_seqs": max(batches), **overrides}))
    engine.start()
    client = LocalClient(engine)
    engine_prefill_ms(client, long_prompt, 1)                       # warm-up
    row = {"prefill_ms": engine_prefill_ms(client, long_prompt, 3), "engine": engine.runner.decoder.status()}
    for b in batches:
        engine_decode_tps(client, prompts[:b].tolist(), 8)          # warm-up at this batch size
        row[f"decode_tps_b{b}"] = engine_decode_tps(client, prompts[:b].tolist(), a.new_tokens)
    engine.stop()
    engine.join()
    return row, engine


AGENT = """
import json, sys, time, libdjinn
sock, start_at, new = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.argv[4])
with libdjinn.connect(sock) as djinn:
    s = djinn.session()
    s.generate(prompt_ids=ids[:4], max_new_tokens=2, ignore_eos=True)          # warm the path
    time.sleep(max(0.0, start_at - time.time()))
    print(json.dumps([time.time() for _ in s.stream(prompt_ids=ids, max_new_tokens=new, ignore_eos=True)]))
"""


def socket_decode_tps(a, prompts, n: int) -> float:
    """n real agent processes streaming at once through a real daemon's socket."""
    proc, sock = start_daemon("--model", a.model, "--device", a.device, "--kv-cache-mb", str(a.kv_cache_mb),
                              "--max-num-seqs", str(max(n, 1)))
    try:
        start_at = time.time() + 5 + 0.1 * n
        agents = [subprocess.Popen([sys.executable, "-c", AGENT, sock, str(start_at), str(a.new_tokens),
                                    json.dumps(prompts[i].tolist())], stdout=subprocess.PIPE, text=True)
                  for i in range(n)]
        times = [json.loads(p.communicate(timeout=600)[0]) for p in agents]
    finally:
        stop_daemon(proc)
    return decode_rate(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-mb", type=float, default=12288)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-eager", action="store_true")
    p.add_argument("--socket-agents", type=int, default=0, help="also stream this many agent processes via a daemon")
    p.add_argument("--out", default="results/bench_decode.json")
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else a.device
    bw = hbm_bandwidth(device)
    prompts, long_prompt = _inputs(a, torch.Generator().manual_seed(0), batches)
    rows = {}
    rows["djinnd"], engine = measure_engine(a, prompts, long_prompt, batches, {})
    model = engine.loaded.model
    model_args = model.args
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_per_token = engine.pool.block_bytes / engine.pool.block_size
    report = {**stamp(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "model": engine.loaded.label, "dtype": str(next(model.parameters()).dtype),
              "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "hbm_bytes_per_s_measured": bw,
              "prompt_len": a.prompt_len, "prefill_len": a.prefill_len, "new_tokens": a.new_tokens,
              "batches": batches, "results": rows}
    ctx = a.prompt_len + a.new_tokens / 2
    report["roofline_tps"] = {f"b{b}": b * bw / (weight_bytes + b * ctx * kv_per_token) for b in batches}
    if not a.skip_hf:
        rows["hf_generate"] = measure_hf(model, prompts, long_prompt, batches, a.new_tokens)
    del engine, model
    if device == "cuda":
        torch.cuda.empty_cache()
    if not a.skip_eager:
        rows["djinnd_eager"], _ = measure_engine(a, prompts, long_prompt, batches[:2],
                                                 {"cuda_graphs": False, "attention": "torch"})
    if a.socket_agents:
        report["socket_agents"] = a.socket_agents
        report["socket_decode_tps"] = socket_decode_tps(a, prompts, a.socket_agents)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report, model_args)


def _inputs(a, gen, batches):
    vocab = 32000 if a.model.startswith("random:llama") else 500
    prompts = torch.randint(3, vocab, (max(batches + [a.socket_agents]), a.prompt_len), generator=gen)
    return prompts, torch.randint(3, vocab, (a.prefill_len,), generator=gen).tolist()


def measure_hf(model, prompts, long_prompt, batches, new_tokens) -> dict:
    hf = hf_model(model)
    dev = model.lm_head.weight.device
    long_ids = torch.tensor([long_prompt], device=dev)
    hf_generate_s(hf, long_ids, 1)
    row = {"prefill_ms": 1e3 * statistics.median(hf_generate_s(hf, long_ids, 1) for _ in range(3))}
    for b in batches:
        row[f"decode_tps_b{b}"] = hf_decode_tps(hf, prompts[:b].to(dev), new_tokens)
    return row


def print_table(r, model_args):
    print(f"\n{r['model']} on {r['device']} ({r['dtype']}, torch {r['torch']}, {r['date']})")
    print(f"weights {r['weight_bytes'] / 1e9:.2f} GB, KV {r['kv_bytes_per_token'] / 2**20:.2f} MiB/token, "
          f"HBM measured {r['hbm_bytes_per_s_measured'] / 1e9:.0f} GB/s; prompts {r['prompt_len']} tokens, "
          f"{r['new_tokens']} new")
    cols = [f"b{b}" for b in r["batches"]]
    print(f"{'':14} {'prefill ' + str(r['prefill_len']) + ' (ms)':>18} " + " ".join(f"{c + ' tok/s':>12}" for c in cols))
    for name, row in r["results"].items():
        cells = " ".join(f"{row.get('decode_tps_' + c, float('nan')):>12.1f}" for c in cols)
        print(f"{name:14} {row['prefill_ms']:>18.1f} {cells}")
    print(f"{'roofline':14} {'':>18} " + " ".join(f"{r['roofline_tps'][c]:>12.1f}" for c in cols))
    if "socket_decode_tps" in r:
        b = r["socket_agents"]
        inproc = r["results"]["djinnd"].get(f"decode_tps_b{b}")
        share = f" = {100 * r['socket_decode_tps'] / inproc:.0f}% of in-process b{b}" if inproc else ""
        print(f"through the socket: {b} agent processes streaming: {r['socket_decode_tps']:.1f} tok/s{share}")


if __name__ == "__main__":
    main()
