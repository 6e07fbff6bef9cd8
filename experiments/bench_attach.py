"""Shared resident weights on a GPU, through a real djinnd: attach time, the GPU memory an attached
process adds (against its own copy of the weights, measured in the same run), 8 attached processes
running HF forwards on the shared weights while the daemon serves agents, and hf_model() logits
against the daemon's own forward on the same device.

    python experiments/bench_attach.py --out experiments/results/bench_attach.json

random:llama-2-7b: seeded random weights in real shapes (12.6 GiB in fp16). Prints a table last.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from experiments.harness import start_daemon, stamp, stop_daemon  # noqa: E402

GiB = 2**30


# ---- agent side (a subprocess of this script) -------------------------------------------------
def agent_measure(sock: str, tokens: int) -> dict:
    """Attach, build the HF model, forward, compare with the daemon; then make an own copy as baseline."""
    import torch

    started = time.perf_counter()
    import transformers.models.llama.modeling_llama  # noqa: F401  (a one-off per process, timed apart)
    import_ms = (time.perf_counter() - started) * 1e3
    from libdjinn.weights import hf_model
    torch.zeros(1, device="cuda")                        # the CUDA context, before anything is measured
    free = [torch.cuda.mem_get_info()[0]]
    djinn = libdjinn.connect(sock)
    started = time.perf_counter()
    w = djinn.attach_weights()
    attach_ms = (time.perf_counter() - started) * 1e3
    model = hf_model(w)
    model_ms = (time.perf_counter() - started) * 1e3 - attach_ms
    free.append(torch.cuda.mem_get_info()[0])
    ids = torch.randint(3, 32000, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = model(ids.cuda()).logits.float().cpu()
    free.append(torch.cuda.mem_get_info()[0])
    theirs = libdjinn.GhostModel(djinn)(ids).logits
    copy = {k: v.clone() for k, v in w.items() if k != "lm_head.weight" or not w.config["tie_word_embeddings"]}
    torch.cuda.synchronize()
    free.append(torch.cuda.mem_get_info()[0])
    del copy
    diff = (mine - theirs).abs()
    return {"attach_ms": attach_ms, "hf_model_ms": model_ms, "transformers_import_ms": import_ms, "weights_bytes": w.nbytes,
            "attach_adds_bytes": free[0] - free[1], "forward_adds_bytes": free[1] - free[2],
            "own_copy_adds_bytes": free[2] - free[3], "max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "logits_max_abs_diff": diff.max().item(), "logits_scale": theirs.abs().max().item(),
            "argmax_agree": (mine.argmax(-1) == theirs.argmax(-1)).float().mean().item()}


def agent_hammer(sock: str, tokens: int, seconds: float) -> dict:
    """Attach, say ready, wait for go (a line on stdin), run HF forwards for `seconds`."""
    import torch
    djinn = libdjinn.connect(sock)
    model = djinn.hf_model()
    ids = torch.randint(3, 32000, (1, tokens), device="cuda")
    with torch.no_grad():
        model(ids)
    torch.cuda.synchronize()
    print("ready", flush=True)
    sys.stdin.readline()
    times, end = [], time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            started = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3)
    return {"forwards": len(times), "forward_ms_p50": statistics.median(times), "forward_ms_max": max(times)}


# ---- driver -----------------------------------------------------------------------------------
def spawn(role: str, sock: str, a) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", role, "--socket", sock, "--tokens", str(a.tokens),
                             "--seconds", str(a.seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def last_json(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    return json.loads(out.strip().splitlines()[-1])


def serve_agents(sock: str, num: int, seconds: float) -> float:
    """num agent sessions generating as fast as they can for `seconds`: tokens/s in all."""
    counts, end = [0] * num, time.perf_counter() + seconds

    def agent(i):
        with libdjinn.connect(sock) as djinn:
            s = djinn.session()
            while time.perf_counter() < end:
                counts[i] += len(s.generate(prompt_ids=list(range(3, 131)), max_new_tokens=32, ignore_eos=True).tokens)
                s.close()
                s = djinn.session()
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(num)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def gpu_memory_by_pid() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
    except OSError:
        return {}
    rows = [line.split(",") for line in out.stdout.strip().splitlines() if "," in line]
    return {int(pid): int(mib) * 2**20 for pid, mib in rows}


def wait_ready(proc: subprocess.Popen):
    """Skip whatever a library printed first; a process that exits before 'ready' is an error."""
    for line in proc.stdout:
        if line.strip() == "ready":
            return
    raise RuntimeError(f"attached process {proc.pid} exited with {proc.wait()} before it was ready")


def concurrent(sock: str, a) -> dict:
    hammers = [spawn("hammer", sock, a) for _ in range(a.attached)]
    for h in hammers:
        wait_ready(h)
    with libdjinn.connect(sock) as djinn:
        attachments = djinn.status()["weights_export"]["attachments"]
    by_pid = gpu_memory_by_pid()
    for h in hammers:
        h.stdin.write("go\n")
        h.stdin.flush()
    tok_s = serve_agents(sock, a.agents, a.seconds)
    results = [last_json(h) for h in hammers]
    return {"attachments": len(attachments), "serving_tok_s": tok_s, "hammers": results,
            "hammer_gpu_bytes": [by_pid.get(h.pid) for h in hammers]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--tokens", type=int, default=512, help="tokens per HF forward of an attached process")
    p.add_argument("--attached", type=int, default=8)
    p.add_argument("--agents", type=int, default=8, help="agent sessions the daemon serves meanwhile")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", default="experiments/results/bench_attach.json")
    p.add_argument("--role", default="driver", choices=["driver", "measure", "hammer"])
    p.add_argument("--socket")
    a = p.parse_args()
    if a.role != "driver":
        fn = agent_measure if a.role == "measure" else agent_hammer
        print(json.dumps(fn(a.socket, a.tokens) if a.role == "measure" else fn(a.socket, a.tokens, a.seconds)))
        return
    daemon, sock = start_daemon("--model", a.model, "--device", "cuda", "--dtype", "float16",
                                "--kv-cache-mb", "8192", "--host-arena-mb", "256")
    try:
        measured = last_json(spawn("measure", sock, a))
        alone = serve_agents(sock, a.agents, a.seconds)
        together = concurrent(sock, a)
        daemon_gpu = gpu_memory_by_pid().get(daemon.pid)
    finally:
        stop_daemon(daemon)
    import torch
    report = {**stamp(), "device": torch.cuda.get_device_name(), "model": a.model, "tokens": a.tokens,
              "measure": measured, "serving_tok_s_alone": alone, "concurrent": together,
              "daemon_gpu_bytes": daemon_gpu}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print_table(report, a)


def print_table(r: dict, a):
    m, c = r["measure"], r["concurrent"]
    h = c["hammers"]
    gpu = [b for b in c["hammer_gpu_bytes"] if b]
    print(f"\n{a.model} (RANDOM WEIGHTS) fp16 on {r['device']}, {r['date']}")
    rows = [
        ("weights exported (one IPC handle)", f"{m['weights_bytes'] / GiB:.2f} GiB"),
        ("attach_weights() (connect excluded)", f"{m['attach_ms']:.1f} ms"),
        ("hf_model() on the attached tensors", f"{m['hf_model_ms']:.1f} ms"),
        ("import transformers (once per process, not in the above)", f"{m.get('transformers_import_ms', 0):.0f} ms"),
        ("GPU memory attach + hf_model adds", f"{m['attach_adds_bytes'] / 2**20:.0f} MiB"),
        (f"GPU memory a {a.tokens}-token forward adds", f"{m['forward_adds_bytes'] / 2**20:.0f} MiB"),
        ("GPU memory an own copy adds (baseline)", f"{m['own_copy_adds_bytes'] / GiB:.2f} GiB"),
        ("per attached process (nvidia-smi: context + activations)",
         f"{statistics.median(gpu) / 2**20:.0f} MiB" if gpu else "n/a"),
        ("hf_model() vs daemon logits, max |diff|", f"{m['logits_max_abs_diff']:.4f} (|logits| up to "
         f"{m['logits_scale']:.1f}), argmax agree {m['argmax_agree']:.3f}"),
        (f"daemon serving {a.agents} agents alone", f"{r['serving_tok_s_alone']:.1f} tok/s"),
        (f"... with {c['attachments']} attached processes forwarding", f"{c['serving_tok_s']:.1f} tok/s"),
        (f"attached forwards ({a.tokens} tokens), p50 / max",
         f"{statistics.median(x['forward_ms_p50'] for x in h):.1f} / {max(x['forward_ms_max'] for x in h):.1f} ms, "
         f"{sum(x['forwards'] for x in h)} in all"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
