"""What the daemon measures: counters, a record per KV swap, latency samples, and the memory
timeline sampled at a fixed period. Read by `djinnctl` and the experiments. Stdlib only."""
import statistics
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass


@dataclass
class SwapRecord:
    t: float            # wall clock when the copy finished
    session: int
    direction: str      # "out" (device -> host) or "in" (host -> device)
    bytes: int
    ms: float
    cause: str          # out: "pressure", "lazy", "prefetch_room"; in: "prefetch", "active", "restore"

    @property
    def gb_per_s(self) -> float:
        return self.bytes / (self.ms * 1e6) if self.ms > 0 else float("inf")


class Metrics:
    def __init__(self, keep: int = 10000):
        self.counters: Counter = Counter()
        self.started_at = time.time()
        self.swaps: deque[SwapRecord] = deque(maxlen=keep)
        self.latency: dict[str, deque] = {}   # name -> recent samples in ms
        self.timeline: deque[dict] = deque(maxlen=4096)

    def inc(self, name: str, n: float = 1):
        self.counters[name] += n

    def record_swap(self, r: SwapRecord):
        self.swaps.append(r)
        self.inc(f"swaps_{r.direction}")
        self.inc(f"swaps_{r.direction}_{r.cause}")
        self.inc(f"swap_bytes_{r.direction}", r.bytes)

    def observe_ms(self, name: str, ms: float):
        self.latency.setdefault(name, deque(maxlen=10000)).append(ms)

    def snapshot(self) -> dict:
        return {"uptime_s": round(time.time() - self.started_at, 1), **self.counters}

    def swap_report(self, recent: int = 20, with_samples: bool = False) -> dict:
        rows = {}
        for direction in ("out", "in"):
            recs = [r for r in self.swaps if r.direction == direction]
            rows[direction] = summary([r.ms for r in recs]) | {
                "gb_per_s_median": statistics.median([r.gb_per_s for r in recs]) if recs else None,
                "bytes": sum(r.bytes for r in recs)}
        report = {"swaps": rows, "latency_ms": {k: summary(list(v)) for k, v in self.latency.items()},
                  "recent": [asdict(r) | {"gb_per_s": r.gb_per_s} for r in list(self.swaps)[-recent:]]}
        if with_samples:
            report["all_ms"] = {d: [r.ms for r in self.swaps if r.direction == d] for d in ("out", "in")}
            report["latency_samples_ms"] = {k: list(v) for k, v in self.latency.items()}
        return report


def summary(samples: list[float]) -> dict:
    if not samples:
        return {"count": 0}
    q = sorted(samples)
    pick = lambda p: q[min(len(q) - 1, int(p * len(q)))]  # noqa: E731
    return {"count": len(q), "mean": sum(q) / len(q), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "max": q[-1]}


class TimelineSampler:
    """Samples probe() into metrics.timeline every period_s on its own thread."""

    def __init__(self, metrics: Metrics, probe, period_s: float):
        self.metrics, self.probe, self.period_s = metrics, probe, period_s
        self._stop = threading.Event()

    def start(self):
        threading.Thread(target=self._run, name="djinn-timeline", daemon=True).start()

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.period_s):
            self.metrics.timeline.append({"t": time.time(), **self.probe()})
