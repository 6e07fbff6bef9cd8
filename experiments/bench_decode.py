"""Decode tok/s by batch size and context length, and prefill time of long prompts: djinnd's engine
(CUDA graphs + split-K paged kernel), the same engine eager, HF transformers `generate` on the same
weights, and the roofline from the HBM bandwidth measured in the same run (CUDA events, before any
engine thread starts), counting the weights and the KV each decode step reads. Optionally the same
batch through the socket: N real agent processes streaming at once from a real daemon.

    python experiments/bench_decode.py --model random:llama-3.1-8b --context 1024,8192,32768 --batches 1,32 \
        --prefill-len 32768

A decode figure at context N feeds each session N tokens first (one request, untimed), then times a
second request that decodes --new-tokens more: the timing holds decode steps only. Prefill is the
time to the first token of a fresh prompt, chunked by max_num_batched_tokens, with the achieved
TFLOP/s counting the linear layers and causal attention. Combinations the KV pool cannot hold are
skipped and listed. Random presets are seeded random weights in real shapes: honest for speed and
memory, not text.
"""
import argparse
import gc
import json
import math
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

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}    # dense bf16/fp16, by device name


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


def random_tokens(batch: int, length: int, vocab: int, salt: int = 0) -> torch.Tensor:
    """The same tokens for the engine and HF: seeded by the shape (and salt, so that no timed prompt
    finds another's blocks in the prefix cache)."""
    gen = torch.Generator().manual_seed(batch * 1_000_003 + length + salt * 7_919)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def engine_prefill_ms(client, prompts) -> float:
    """Time to the first token of a fresh session's prompt: one prefill and one sample (median)."""
    times = []
    for prompt in prompts:
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


def engine_decode_tps(client, prompts: list[list[int]], new_tokens) -> float:
    """Each session is fed its prompt but the last token (untimed), then decodes new_tokens timed."""
    sessions = [client.open() for _ in prompts]
    for e in [client.submit(s, p[:-1], 1) for s, p in zip(sessions, prompts)]:
        client.done(e)
    pending = [client.submit(s, p[-1:], new_tokens) for s, p in zip(sessions, prompts)]
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
    # warm-up at this shape; on CPU at every length it will decode through: its matmul and attention
    # kernels are set up per shape, and a first pass ran 20x slower than the next ones
    hf_generate_s(hf, ids, new_tokens if ids.device.type == "cpu" else 2)
    return ids.shape[0] * (new_tokens - 1) / (hf_generate_s(hf, ids, new_tokens) - hf_generate_s(hf, ids, 1))


def fits(facts: dict, batch: int, tokens: int) -> bool:
    """The engine can hold `batch` sessions of `tokens` tokens at once."""
    blocks = -(-tokens // facts["block_size"])
    return batch <= facts["max_num_seqs"] and tokens <= facts["max_model_len"] and batch * blocks <= facts["num_blocks"]


def measure_engine(a, batches, contexts, prefill_lens, overrides) -> tuple[dict, dict, object]:
    """Prefill ms per prompt length and decode tok/s per (context, batch); the engine's facts; the model."""
    # prefix sharing off: repeated prompts (warm-ups, repeats) must be prefilled, not found cached
    engine = build_engine(load_config(None, {"model": a.model, "device": a.device, "kv_cache_mb": a.kv_cache_mb,
                                             "max_num_seqs": max(batches), "prefix_sharing": "off", **overrides}))
    engine.start()
    client = LocalClient(engine)
    facts = {"block_size": engine.pool.block_size, "num_blocks": engine.pool.num_blocks,
             "max_num_seqs": max(batches), "max_model_len": engine.max_model_len,
             "kv_bytes_per_token": engine.pool.block_bytes / engine.pool.block_size,
             "vocab": engine.loaded.model.args.vocab_size, "label": engine.loaded.label}
    row = {"engine": engine.runner.decoder.status(), "prefill_ms": {}, "decode_tps": {}, "skipped": []}
    for b in batches:                                                # warm-up: graphs, sampler, this batch size
        engine_decode_tps(client, random_tokens(b, 16, facts["vocab"]).tolist(), 8)
    chunk = engine.config.engine.max_num_batched_tokens
    for n in prefill_lens:
        if not fits(facts, 1, n + 1):
            row["skipped"].append(f"prefill {n}")
            continue
        prompts = random_tokens(3 if n <= 8192 else 1, n, facts["vocab"], salt=1).tolist()
        engine_prefill_ms(client, random_tokens(1, min(n, 2 * chunk + 16), facts["vocab"], salt=2).tolist())  # warm-up
        row["prefill_ms"][n] = engine_prefill_ms(client, prompts)
    for c in contexts:
        for b in batches:
            if not fits(facts, b, c + a.new_tokens):
                row["skipped"].append(f"decode b{b} at {c}")
                continue
            prompts = random_tokens(b, c, facts["vocab"]).tolist()
            if engine.device.type == "cpu":   # warm-up through every length, as HF gets (kernels set up per shape)
                engine_decode_tps(client, random_tokens(b, c, facts["vocab"], salt=3).tolist(), a.new_tokens)
            row["decode_tps"].setdefault(c, {})[b] = engine_decode_tps(client, prompts, a.new_tokens)
            print(f"  {overrides or 'djinnd'}: context {c} b{b}: {row['decode_tps'][c][b]:.1f} tok/s", flush=True)
    engine.stop()
    engine.join()
    return row, facts, engine.loaded.model


def measure_hf(model, batches, contexts, prefill_lens, facts, a) -> dict:
    hf = hf_model(model)
    dev = model.lm_head.weight.device
    row = {"prefill_ms": {}, "decode_tps": {}, "skipped": []}
    hf_generate_s(hf, random_tokens(1, 16, facts["vocab"]).to(dev), 1)     # warm-up
    for n in prefill_lens:
        if n > a.hf_max_tokens:
            row["skipped"].append(f"prefill {n}")
            continue
        ids = random_tokens(1, n, facts["vocab"], salt=1).to(dev)
        hf_generate_s(hf, ids, 1)                                                      # warm-up at this shape
        row["prefill_ms"][n] = 1e3 * statistics.median(hf_generate_s(hf, ids, 1) for _ in range(3 if n <= 8192 else 1))
    for c in contexts:
        for b in batches:
            if b * c > a.hf_max_tokens or not fits(facts, b, c + a.new_tokens):
                row["skipped"].append(f"decode b{b} at {c}")
                continue
            row["decode_tps"].setdefault(c, {})[b] = hf_decode_tps(hf, random_tokens(b, c, facts["vocab"]).to(dev),
                                                                   a.new_tokens)
    return row


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


def model_facts(model) -> dict:
    """Bytes a decode step reads (every weight but the embedding table, of which it reads a few rows,
    unless the LM head shares it) and FLOPs per prompt token in the linear layers."""
    params = {id(p): p for p in model.parameters()}.values()
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    linear = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    a = model.args
    return {"weight_bytes": weight_bytes,
            "weight_bytes_per_step": weight_bytes - (0 if tied else embed.numel() * embed.element_size()),
            "linear_params": linear, "attention_dims": a.num_layers * a.num_heads * a.head_dim,
            "dtype": str(embed.dtype)}


def prefill_tflops(facts: dict, n: int, ms: float) -> float:
    """Linear layers 2 FLOPs per weight per token; causal attention 2 * layers * heads * head_dim * n^2
    (QK^T and PV, each half of an n x n square)."""
    flops = 2 * facts["linear_params"] * n + 2 * facts["attention_dims"] * n * n
    return flops / (ms / 1e3) / 1e12


def roofline(facts: dict, bw: float, batches, context: int, new_tokens: int) -> dict:
    """Tokens/s if a step only had to read the weights once and each session's KV (its mean context)."""
    kv = facts["kv_bytes_per_token"] * (context + new_tokens / 2)
    return {f"b{b}": b * bw / (facts["weight_bytes_per_step"] + b * kv) for b in batches}


def build_report(a, rows, facts, bw, batches, contexts, prefill_lens, device) -> dict:
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in facts["device"]), float("nan"))
    report = {**stamp(), "device": facts["device"], "torch": torch.__version__, "model": facts["label"],
              "dtype": facts["dtype"], "weight_bytes": facts["weight_bytes"],
              "weight_bytes_per_step": facts["weight_bytes_per_step"], "kv_bytes_per_token": facts["kv_bytes_per_token"],
              "hbm_bytes_per_s_measured": bw, "peak_tflops": peak, "context": contexts[0], "contexts": contexts,
              "prefill_lens": prefill_lens, "new_tokens": a.new_tokens, "batches": batches,
              "skipped": {name: row["skipped"] for name, row in rows.items() if row["skipped"]}}
    report["by_context"] = {str(c): {
        "results": {name: {f"decode_tps_b{b}": tps for b, tps in row["decode_tps"].get(c, {}).items()}
                    for name, row in rows.items()},
        "roofline_tps": roofline(facts, bw, batches, c, a.new_tokens),
        **({"roofline_tps_fp8kv": roofline({**facts, "kv_bytes_per_token": facts["kv_bytes_per_token_fp8kv"]}, bw,
                                           batches, c, a.new_tokens)} if "djinnd_fp8kv" in rows else {})}
        for c in contexts}
    report["prefill"] = {str(n): {name: {"ms": row["prefill_ms"][n], "tflops": prefill_tflops(facts, n, row["prefill_ms"][n]),
                                         "share_of_peak": prefill_tflops(facts, n, row["prefill_ms"][n]) / peak}
                                  for name, row in rows.items() if n in row["prefill_ms"]} for n in prefill_lens}
    first = report["by_context"][str(contexts[0])]
    report["roofline_tps"] = first["roofline_tps"]
    report["results"] = {name: {**first["results"][name], "prefill_ms": row["prefill_ms"].get(prefill_lens[0], math.nan),
                                **({"engine": row["engine"]} if "engine" in row else {})} for name, row in rows.items()}
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-mb", type=float, default=0, help="0: the engine's default (90%% of free GPU memory)")
    p.add_argument("--context", default="128", help="tokens of context before decode; several: 1024,8192,32768")
    p.add_argument("--prefill-len", default="1024", help="prompt lengths whose time to first token is measured")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-max-tokens", type=int, default=65536, help="HF runs where batch x context is at most this")
    p.add_argument("--skip-eager", action="store_true")
    p.add_argument("--fp8-kv", action="store_true", help="also the engine with kv_cache_dtype fp8_e4m3 (djinnd_fp8kv)")
    p.add_argument("--peak-tflops", type=float, default=0, help="0: from the device name (dense bf16)")
    p.add_argument("--socket-agents", type=int, default=0, help="also stream this many agent processes via a daemon")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting for every djinnd run, e.g. max_num_batched_tokens=4096")
    p.add_argument("--out", default="results/bench_decode.json")
    a = p.parse_args()
    batches, contexts, prefill_lens = ints(a.batches), ints(a.context), ints(a.prefill_len)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    bw = hbm_bandwidth(device)
    rows = {}
    settings = dict(map(setting, a.set))
    rows["djinnd"], facts, model = measure_engine(a, batches, contexts, prefill_lens, settings)
    facts.update(model_facts(model), device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    free_device_memory()               # the engine's pool and graphs go before HF needs room
    if not a.skip_hf:
        rows["hf_generate"] = measure_hf(model, batches, contexts, prefill_lens, facts, a)
        free_device_memory()
    if a.fp8_kv:
        rows["djinnd_fp8kv"], fp8, _ = measure_engine(a, batches, contexts, [],
                                                     {**settings, "kv_cache_dtype": "fp8_e4m3"})
        facts["kv_bytes_per_token_fp8kv"] = fp8["kv_bytes_per_token"]
        free_device_memory()
    if not a.skip_eager:
        rows["djinnd_eager"], _, _ = measure_engine(a, batches[:2], contexts[:1], prefill_lens[:1],
                                                    {"cuda_graphs": False, "attention": "torch"})
    report = build_report(a, rows, facts, bw, batches, contexts, prefill_lens, device)
    report["engine_settings"] = settings
    if a.socket_agents:
        report["socket_agents"] = a.socket_agents
        prompts = random_tokens(a.socket_agents, contexts[0], facts["vocab"])
        report["socket_decode_tps"] = socket_decode_tps(a, prompts, a.socket_agents)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report)


def setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def free_device_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(r):
    print(f"\n{r['model']} on {r['device']} ({r['dtype']}, torch {r['torch']}, {r['date']})")
    print(f"weights {r['weight_bytes'] / 1e9:.2f} GB ({r['weight_bytes_per_step'] / 1e9:.2f} GB read per step), "
          f"KV {r['kv_bytes_per_token'] / 2**10:.0f} KiB/token, HBM measured {r['hbm_bytes_per_s_measured'] / 1e9:.0f} "
          f"GB/s; {r['new_tokens']} new tokens")
    cols = [f"b{b}" for b in r["batches"]]
    print(f"{'context':>8} {'':14} " + " ".join(f"{c + ' tok/s':>16}" for c in cols))
    for c, block in r["by_context"].items():
        roof = block["roofline_tps"]
        for name, row in block["results"].items():
            own = block.get("roofline_tps_fp8kv", roof) if name == "djinnd_fp8kv" else roof   # % of its own roofline
            cells = [(row.get("decode_tps_" + k), own[k]) for k in cols]
            print(f"{c:>8} {name:14} " + " ".join(f"{t:>9.1f} ({100 * t / m:>3.0f}%)" if t else f"{'-':>16}"
                                                   for t, m in cells))
        print(f"{c:>8} {'roofline':14} " + " ".join(f"{roof[k]:>16.1f}" for k in cols))
    print(f"{'prefill':>8} {'':14} {'ms':>10} {'TFLOP/s':>9} {'of peak':>8}")
    for n, block in r["prefill"].items():
        for name, x in block.items():
            print(f"{n:>8} {name:14} {x['ms']:>10.1f} {x['tflops']:>9.1f} {100 * x['share_of_peak']:>7.0f}%")
    for name, skipped in r["skipped"].items():
        print(f"skipped ({name}): {', '.join(skipped)}")
    if "socket_decode_tps" in r:
        b = r["socket_agents"]
        inproc = r["results"]["djinnd"].get(f"decode_tps_b{b}")
        share = f" = {100 * r['socket_decode_tps'] / inproc:.0f}% of in-process b{b}" if inproc else ""
        print(f"through the socket: {b} agent processes streaming: {r['socket_decode_tps']:.1f} tok/s{share}")


if __name__ == "__main__":
    main()
