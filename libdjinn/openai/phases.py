"""How long each tool takes, learned from the gap between a `tool_calls` reply and the request that
brings its results; the front passes it to set_phase(IO_WAIT, expected_s) so the daemon can page
the session out and prefetch it back in time."""
import threading


class ToolDurations:
    """An exponentially weighted moving average of observed seconds, per tool name."""

    def __init__(self, alpha: float = 0.3):
        self.alpha, self.seconds, self._lock = alpha, {}, threading.Lock()

    def observe(self, name: str, seconds: float):
        with self._lock:
            old = self.seconds.get(name)
            self.seconds[name] = seconds if old is None else old + self.alpha * (seconds - old)

    def expected(self, names: list[str]) -> float | None:
        """Calls run in parallel: the wait is the slowest known one; None until any is known."""
        known = [self.seconds[n] for n in names if n in self.seconds]
        return max(known) if known else None
