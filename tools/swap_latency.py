"""Draw the KV swap-latency distribution (CDF per direction) of a running djinnd as a PNG.

    python tools/swap_latency.py --socket /run/djinn/djinnd.sock --png swaps.png
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from libdjinn import plots  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket")
    p.add_argument("--png", required=True)
    a = p.parse_args()
    with libdjinn.connect(a.socket) as djinn:
        report = djinn.request("swaps")
    plots.plot_swap_latency(report["all_ms"], a.png)
    print(f"{sum(len(v) for v in report['all_ms'].values())} swaps -> {a.png}")


if __name__ == "__main__":
    main()
