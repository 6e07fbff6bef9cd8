"""What stop strings cost the OpenAI front per generated token: the old matcher (a search of every stop
string over the whole text, and a prefix loop per stop for what to hold back) against the
Aho-Corasick StopMatcher, both fed the same growing text one token (~4 characters) at a time.

    python experiments/bench_stops.py --out experiments/results/bench_stops_cpu.json
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.harness import stamp  # noqa: E402
from libdjinn.openai.stops import StopMatcher  # noqa: E402


def old_matcher(stops):
    """Round 2's TextStream: find() of every stop, then a prefix loop per stop."""
    def feed(text):
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        held = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return (min(hits) if hits else None), held
    return feed


def new_matcher(stops):
    m = StopMatcher(stops)
    return lambda text: (m.feed(text), m.held)


def per_token_us(make, stops, tokens: int, rng) -> float:
    text, feed = "", make(stops)
    started = time.perf_counter()
    for _ in range(tokens):
        text += "".join(rng.choice("abcdefgh ") for _ in range(4))
        feed(text)
    return (time.perf_counter() - started) / tokens * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = random.Random(0)
    cases = [(1, 8), (4, 32), (16, 256), (3000, 3000)]      # (count, characters): 16 x 256 is the front's cap
    rows = []
    for count, chars in cases:
        stops = ["".join(rng.choice("abcdefgh") for _ in range(chars - 1)) + "z" for _ in range(count)]
        old = per_token_us(old_matcher, stops, args.tokens if count < 3000 else 10, random.Random(1))
        new = per_token_us(new_matcher, stops, args.tokens, random.Random(1))
        rows.append({"stops": count, "chars": chars, "old_us_per_token": old, "new_us_per_token": new})
    result = {**stamp(), "tokens": args.tokens, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"{'stops':>6} {'chars':>6} {'old us/token':>14} {'new us/token':>14}")
    for r in rows:
        print(f"{r['stops']:>6} {r['chars']:>6} {r['old_us_per_token']:>14.1f} {r['new_us_per_token']:>14.1f}")


if __name__ == "__main__":
    main()
