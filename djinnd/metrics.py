"""Counters the engine keeps and `djinnctl status` shows. Stdlib only."""
import time
from collections import Counter


class Metrics:
    def __init__(self):
        self.counters: Counter = Counter()
        self.started_at = time.time()

    def inc(self, name: str, n: float = 1):
        self.counters[name] += n

    def snapshot(self) -> dict:
        return {"uptime_s": round(time.time() - self.started_at, 1), **self.counters}
