"""/metrics in the Prometheus text format: the front's own request counters and the daemon's counters,
KV pool and host arena use, swaps and sessions by phase, from a status a watcher thread keeps fresh
(so neither /metrics nor /health waits behind requests or behind the daemon's step)."""
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from libdjinn.openai.daemon_link import DaemonDown


class DaemonWatch:
    """The daemon's latest `status` (or why it has none), fetched every period_s on its own thread."""

    def __init__(self, link, period_s: float = 1.0):
        self.link, self.period_s = link, period_s
        self.status: dict | None = None
        self.down: str | None = None          # why the last fetch failed
        self.fetched = threading.Event()

    def refresh(self):
        try:
            self.status, self.down = self.link.status(), None
        except DaemonDown as e:
            self.status, self.down = None, str(e)
        self.fetched.set()

    def run(self, stop: threading.Event):
        while not stop.is_set():
            self.refresh()
            stop.wait(self.period_s)

    def latest(self) -> dict | None:
        """The last status fetched (None: the daemon is down); waits only for the very first fetch."""
        self.fetched.wait(30)
        return self.status


class DaemonCollector:
    """The daemon's `status` as gauges, from the watcher's latest fetch."""

    def __init__(self, front, watch: DaemonWatch):
        self.front, self.watch = front, watch

    def collect(self):
        up = GaugeMetricFamily("djinn_daemon_up", "1 if djinnd answers")
        status = self.watch.latest()
        if status is None:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _flat("djinn_daemon_counter", "daemon counter", status["counters"])
        yield from _flat("djinn_daemon_memory", "daemon memory figure", status["memory"])
        for direction, row in status["swaps"]["swaps"].items():
            yield _gauge(f"djinn_daemon_swaps_{direction}", f"swaps {direction} so far", row.get("count", 0))
        phases = GaugeMetricFamily("djinn_daemon_sessions", "sessions by phase and state", labels=["phase", "state"])
        counts = {}
        for row in status["sessions"]:
            counts[(row["phase"], row["state"])] = counts.get((row["phase"], row["state"]), 0) + 1
        for (phase, state), n in counts.items():
            phases.add_metric([phase, state], n)
        yield phases
        yield _gauge("djinn_openai_conversations", "conversations the front tracks", len(self.front.table.items))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _flat(name: str, doc: str, values: dict):
    g = GaugeMetricFamily(name, doc, labels=["name"])
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            g.add_metric([key], value)
    yield g


class FrontMetrics:
    def __init__(self, front):
        self.watch = DaemonWatch(front.link)
        self.registry = CollectorRegistry()
        self.requests = Counter("djinn_openai_requests", "requests answered", ["finish_reason"], registry=self.registry)
        self.tokens = Counter("djinn_openai_tokens", "tokens by kind", ["kind"], registry=self.registry)
        self.latency = Histogram("djinn_openai_request_seconds", "request latency", registry=self.registry)
        self.first_token = Histogram("djinn_openai_ttft_seconds", "time to the first streamed text",
                                     registry=self.registry)
        self.registry.register(DaemonCollector(front, self.watch))

    def request_done(self, outcome, started: float):
        self.requests.labels(outcome.finish_reason).inc()
        self.tokens.labels("prompt").inc(outcome.prompt_tokens)
        self.tokens.labels("cached").inc(outcome.cached_tokens)
        self.tokens.labels("completion").inc(outcome.completion_tokens)
        self.latency.observe(time.monotonic() - started)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
