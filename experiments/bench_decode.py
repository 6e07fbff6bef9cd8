"""Decode tok/s at batch 1 and 32 and prefill time: djinnd's engine and HF transformers `generate`
in the same run, on the same weights, next to the HBM roofline measured in the same run.

    python experiments/bench_decode.py --model random:llama-2-7b --out results/bench_decode.json

Random presets are seeded random weights in real shapes: honest for speed and memory, not text.
The engine is driven in-process (no socket), the way the daemon's server drives it.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import load_config  # noqa: E402
from djinnd.daemon import build_engine  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from djinnd.model.llama import hf_state_dict  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hbm_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    if torch.device(device).type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)


def engine_prefill_s(client, prompt, repeats) -> float:
    times = []
    for _ in range(repeats):
        session = client.open()
        start = time.perf_counter()
        client.done(client.submit(session, prompt, 1))
        times.append(time.perf_counter() - start)
        client.close(session)
    return statistics.median(times)


def engine_decode_tps(client, prompts, new_tokens) -> float:
    sessions = [client.open() for _ in prompts]
    pending = [client.submit(s, p, new_tokens) for s, p in zip(sessions, prompts)]
    times = [client.done(e)[1] for e in pending]
    for s in sessions:
        client.close(s)
    decode_start = max(t[0] for t in times)      # every session has its first token
    decode_end = max(t[-1] for t in times)
    return len(prompts) * (new_tokens - 1) / (decode_end - decode_start)


def hf_model(model):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**model.args.to_hf()))
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-mb", type=float, default=12288)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default="results/bench_decode.json")
    a = p.parse_args()
    config = load_config(None, {"model": a.model, "device": a.device, "kv_cache_mb": a.kv_cache_mb,
                                "max_num_batched_tokens": max(4096, a.batch * a.prompt_len)})
    engine = build_engine(config)
    engine.start()
    client, model = LocalClient(engine), engine.loaded.model
    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (a.batch, a.prompt_len), generator=gen)
    long_prompt = torch.randint(3, vocab, (a.prefill_len,), generator=gen).tolist()

    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_bytes_per_token = engine.pool.block_bytes / engine.pool.block_size
    bw = hbm_bandwidth(engine.device)
    mean_ctx = a.prompt_len + a.new_tokens / 2
    rows = {}
    engine_prefill_s(client, long_prompt, 1)                       # warm-up
    rows["djinnd"] = {
        "prefill_ms": 1e3 * engine_prefill_s(client, long_prompt, 3),
        "decode_tps_b1": engine_decode_tps(client, prompts[:1].tolist(), a.new_tokens),
        f"decode_tps_b{a.batch}": engine_decode_tps(client, prompts.tolist(), a.new_tokens),
    }
    engine.stop()
    if not a.skip_hf:
        hf = hf_model(model)
        dev = model.lm_head.weight.device
        long_ids = torch.tensor([long_prompt], device=dev)
        hf_generate_s(hf, long_ids, 1)
        rows["hf_generate"] = {
            "prefill_ms": 1e3 * statistics.median(hf_generate_s(hf, long_ids, 1) for _ in range(3)),
            "decode_tps_b1": hf_decode_tps(hf, prompts[:1].to(dev), a.new_tokens),
            f"decode_tps_b{a.batch}": hf_decode_tps(hf, prompts.to(dev), a.new_tokens),
        }
    roofline_b1 = bw / (weight_bytes + mean_ctx * kv_bytes_per_token)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": engine.loaded.label, "dtype": str(next(model.parameters()).dtype),
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token,
        "hbm_bytes_per_s_measured": bw, "roofline_tps_b1": roofline_b1,
        "prompt_len": a.prompt_len, "prefill_len": a.prefill_len, "new_tokens": a.new_tokens, "batch": a.batch,
        "results": rows,
    }
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report, a.batch)


def print_table(r, batch):
    print(f"\n{r['model']} on {r['device']} ({r['dtype']}, torch {r['torch']}, {r['date']})")
    print(f"weights {r['weight_bytes'] / 1e9:.2f} GB, KV {r['kv_bytes_per_token'] / 2**20:.2f} MiB/token, "
          f"HBM measured {r['hbm_bytes_per_s_measured'] / 1e9:.0f} GB/s -> batch-1 roofline "
          f"{r['roofline_tps_b1']:.0f} tok/s")
    print(f"{'':14} {'prefill ' + str(r['prefill_len']) + ' tok (ms)':>22} {'decode b1 tok/s':>16} "
          f"{f'decode b{batch} tok/s':>17}")
    for name, row in r["results"].items():
        print(f"{name:14} {row['prefill_ms']:>22.1f} {row['decode_tps_b1']:>16.1f} {row[f'decode_tps_b{batch}']:>17.1f}")


if __name__ == "__main__":
    main()
