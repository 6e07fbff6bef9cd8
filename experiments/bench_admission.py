"""What admission order does to an agent back from a tool call during a burst of new agents,
in-process (no socket): the agent's turn is queued right behind `--burst` fresh sessions' long
first prompts, under each `admission` order, and its TTFT timed from the engine's own
token events. Repeated `--repeats` times per order; medians printed last.

    python experiments/bench_admission.py                          # embedded model on CPU
    python experiments/bench_admission.py --model random:llama-2-7b --device cuda
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from djinnd.config import ADMISSION, load_config  # noqa: E402
from djinnd.daemon import build_engine  # noqa: E402
from djinnd.engine.local import LocalClient  # noqa: E402
from experiments.harness import stamp  # noqa: E402


def resumed_ttft_ms(client, rng, vocab: int, burst: int, prompt_len: int, history: int) -> float:
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    agent = client.open()                      # the older program: opened first, its history cached
    client.done(client.submit(agent, ids(history), 4))
    fresh = [client.open() for _ in range(burst)]
    pending = [client.submit(s, ids(prompt_len), 4) for s in fresh]
    started = time.perf_counter()
    _, times = client.done(client.submit(agent, ids(16), 4))    # back from its tool call
    for p in pending:
        client.done(p)
    for s in fresh + [agent]:
        client.close(s)
    return (times[0] - started) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--burst", type=int, default=16, help="new agents' first prompts queued just before")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--history", type=int, default=512, help="tokens the returning agent already holds")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows = {}
    for order in ADMISSION:
        engine = build_engine(load_config(None, {"model": a.model, "device": a.device, "kv_cache_mb": 1024,
                                                 "admission": order}))
        engine.start()
        client, rng = LocalClient(engine), random.Random(0)
        vocab = engine.loaded.model.args.vocab_size
        resumed_ttft_ms(client, rng, vocab, 1, 32, 32)                  # warm-up
        rows[order] = [resumed_ttft_ms(client, rng, vocab, a.burst, a.prompt_len, a.history)
                       for _ in range(a.repeats)]
        engine.stop()
        engine.join()
    report = {**stamp(), "args": vars(a), "resumed_ttft_ms": rows}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"\n{a.model} on {a.device}: a resumed turn queued behind {a.burst} first prompts of {a.prompt_len} tokens")
    for order, ms in rows.items():
        print(f"admission {order:<8} TTFT median {statistics.median(ms):8.1f} ms   all {[round(x) for x in ms]}")


if __name__ == "__main__":
    main()
