"""Drive an engine in-process, the way the server does (commands in, events out), without a
socket: for benchmarks and tests that measure the engine itself."""
import queue
import time

from djinnd.engine import commands as cmd
from djinnd.session import SamplingParams


class LocalClient:
    def __init__(self, engine):
        self.engine = engine

    def call(self, make) -> queue.Queue:
        events = queue.Queue()
        self.engine.inbox.put(make(lambda e: events.put((time.perf_counter(), e))))
        return events

    def open(self) -> int:
        return self.call(lambda r: cmd.OpenSession(0, 0, r)).get(timeout=600)[1].payload["session"]

    def close(self, session: int):
        self.call(lambda r: cmd.CloseSession(0, session, r)).get(timeout=600)

    def set_phase(self, session: int, phase: str, expected_s: float | None = None):
        self.call(lambda r: cmd.SetPhase(0, session, phase, expected_s, r)).get(timeout=600)

    def submit(self, session: int, prompt_ids, max_new_tokens: int = 64, ignore_eos=True,
               params: SamplingParams | None = None) -> queue.Queue:
        params = params or SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
        return self.call(lambda r: cmd.Generate(0, session, list(prompt_ids), params, r))

    @staticmethod
    def done(events: queue.Queue) -> tuple[cmd.Done, list[float]]:
        """The final event, and the arrival time of every token."""
        times = []
        while True:
            t, e = events.get(timeout=600)
            if isinstance(e, cmd.Token):
                times.append(t)
                continue
            if not isinstance(e, cmd.Done):
                raise RuntimeError(f"request failed: {e}")
            return e, times
