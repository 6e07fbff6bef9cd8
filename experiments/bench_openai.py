"""The HTTP front's cost and what session affinity buys, through a real djinnd and real djinn-openai
processes, with the official openai client:

1. 32 concurrent streams: tokens/s and TTFT through the front vs direct libdjinn, same prompts.
2. An agent loop with tool calls (forced, so every turn calls the tool): latency of the request
   that brings the tool result, with the history resident (affinity) vs re-prefilled (a second
   front whose conversations expire at once).

    python experiments/bench_openai.py --device cuda --out experiments/results/bench_openai.json

The model needs a tokenizer (chat templates): the embedded smollm2-135m, or an HF directory.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from experiments.harness import ROOT, stamp, start_daemon, stop_daemon  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]


def start_front(sock: str, *flags) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "libdjinn.openai", "--socket", sock, "--listen",
                             f"127.0.0.1:{port}", *flags], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    import httpx
    for _ in range(300):
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("djinn-openai did not start")


def run_threads(fn, n: int) -> tuple[list, float]:
    out, started = [None] * n, time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out, time.perf_counter() - started


def prompts(n: int, length: int) -> list[list[int]]:
    import random
    rng = random.Random(0)
    return [[rng.randrange(100, 10000) for _ in range(length)] for _ in range(n)]


def direct_streams(sock, ids, max_tokens):
    with libdjinn.connect(sock) as djinn:
        def one(i):
            s, t0, first, n = djinn.session(), time.perf_counter(), None, 0
            for _ in s.stream(prompt_ids=ids[i], max_new_tokens=max_tokens, ignore_eos=True):
                first, n = first or time.perf_counter() - t0, n + 1
            s.close()
            return first, n
        return run_threads(one, len(ids))


def front_streams(url, ids, max_tokens):
    import openai
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

    def one(i):
        t0, first, n = time.perf_counter(), None, 0
        for chunk in client.completions.create(model="djinn", prompt=ids[i], max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - t0
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return first, n
    return run_threads(one, len(ids))


def stream_row(name, results, wall):
    ttfts = [r[0] for r in results if r[0] is not None]
    tokens = sum(r[1] for r in results)
    return {"path": name, "streams": len(results), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "ttft_ms_p50": 1e3 * statistics.median(ttfts), "ttft_ms_max": 1e3 * max(ttfts)}


def agent_loop(url, agents: int, turns: int, tool_s: float, history_words: int):
    import openai
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    force = {"type": "function", "function": {"name": "lookup"}}

    def one(i):
        messages = [{"role": "system", "content": "You are a careful researcher. " + "Notes: " * history_words},
                    {"role": "user", "content": f"Look up word number {i}."}]
        after_tool = []
        for _ in range(turns):
            r = client.chat.completions.create(model="djinn", messages=messages, tools=TOOLS, tool_choice=force,
                                               max_tokens=16, temperature=0)
            call = r.choices[0].message.tool_calls[0]
            time.sleep(tool_s)
            messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "a definition " * 8}]
            t0 = time.perf_counter()
            r = client.chat.completions.create(model="djinn", messages=messages, tools=TOOLS, tool_choice="none",
                                               max_tokens=8, temperature=0)
            after_tool.append((time.perf_counter() - t0, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
            messages += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "And the next one?"}]
        return after_tool
    out, wall = run_threads(one, agents)
    rows = [x for per_agent in out for x in per_agent]
    return {"requests": len(rows), "wall_s": wall, "after_tool_ms_p50": 1e3 * statistics.median(r[0] for r in rows),
            "after_tool_ms_max": 1e3 * max(r[0] for r in rows), "prompt_tokens": sum(r[1] for r in rows),
            "cached_tokens": sum(r[2] for r in rows)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--kv-cache-mb", default="8192")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--tool-s", type=float, default=0.2)
    p.add_argument("--history-words", type=int, default=1500)
    p.add_argument("--out", default="experiments/results/bench_openai.json")
    a = p.parse_args()
    daemon, sock = start_daemon("--model", a.model, "--device", a.device, "--kv-cache-mb", a.kv_cache_mb)
    resident, url = start_front(sock)
    reprefill, url_reprefill = start_front(sock, "--conversation-ttl-s", "0.000001")
    try:
        ids = prompts(a.streams, a.prompt_len)
        direct_streams(sock, ids[:4], 8)                     # warm-up, both paths
        front_streams(url, ids[:4], 8)
        streams = [stream_row("direct libdjinn", *direct_streams(sock, ids, a.max_tokens)),
                   stream_row("HTTP front", *front_streams(url, ids, a.max_tokens))]
        loops = [{"history": "resident"} | agent_loop(url, a.agents, a.turns, a.tool_s, a.history_words),
                 {"history": "re-prefilled"} | agent_loop(url_reprefill, a.agents, a.turns, a.tool_s, a.history_words)]
        with libdjinn.connect(sock) as djinn:
            status = djinn.status()
    finally:
        for proc in (resident, reprefill):
            proc.terminate()
            proc.wait(30)
        stop_daemon(daemon)
    result = {**stamp(), "device": status["device"], "model": status["model"]["label"], "args": vars(a),
              "streams": streams, "agent_loop": loops,
              "front_vs_direct_tok_per_s": streams[1]["tok_per_s"] / streams[0]["tok_per_s"]}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\n{a.streams} concurrent streams, {a.prompt_len}-token prompts, {a.max_tokens} new tokens each")
    print(f"{'path':<18}{'tok/s':>10}{'TTFT p50 ms':>14}{'TTFT max ms':>14}")
    for r in streams:
        print(f"{r['path']:<18}{r['tok_per_s']:>10.1f}{r['ttft_ms_p50']:>14.1f}{r['ttft_ms_max']:>14.1f}")
    print(f"front / direct throughput: {100 * result['front_vs_direct_tok_per_s']:.1f}%")
    print(f"\nagent loop: {a.agents} agents x {a.turns} tool calls ({a.tool_s}s each); request after the tool")
    print(f"{'history':<14}{'p50 ms':>10}{'max ms':>10}{'prompt tok':>12}{'cached tok':>12}")
    for r in loops:
        print(f"{r['history']:<14}{r['after_tool_ms_p50']:>10.1f}{r['after_tool_ms_max']:>10.1f}"
              f"{r['prompt_tokens']:>12}{r['cached_tokens']:>12}")


if __name__ == "__main__":
    main()
