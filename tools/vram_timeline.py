"""Draw the memory timeline of a running djinnd (or of a saved timeline JSON) as a PNG and CSV.

    python tools/vram_timeline.py --socket /run/djinn/djinnd.sock --png vram.png --csv vram.csv
    python tools/vram_timeline.py --json results/exp_paging.json --png vram.png
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libdjinn  # noqa: E402
from libdjinn import plots  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket")
    p.add_argument("--json", help="a file holding {'timeline': [...]} instead of a live daemon")
    p.add_argument("--png", required=True)
    p.add_argument("--csv")
    a = p.parse_args()
    if a.json:
        with open(a.json) as fh:
            samples = json.load(fh)["timeline"]
    else:
        with libdjinn.connect(a.socket) as djinn:
            samples = djinn.request("timeline")["timeline"]
    plots.plot_timeline(samples, a.png)
    if a.csv:
        plots.write_timeline_csv(samples, a.csv)
    print(f"{len(samples)} samples -> {a.png}")


if __name__ == "__main__":
    main()
