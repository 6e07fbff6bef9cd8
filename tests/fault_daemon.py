"""djinnd with injected faults, for the reliability tests: `python tests/fault_daemon.py FAULT[,FAULT]
<djinnd flags>`. The faults are the only change; everything else is the real daemon."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout not installed
from djinnd import cli  # noqa: E402


class InjectedDeath(BaseException):
    """Escapes every `except Exception`: stands for a bug that kills the engine thread."""


def prefetch_fails_once():
    from djinnd.memory.swapper import Swapper
    original, fired = Swapper.swap_in, []

    def swap_in(self, session, host_runs, device_blocks, cause, *args, **kwargs):
        if cause == "prefetch" and not fired:
            fired.append(1)
            raise RuntimeError("injected fault: swap_in on the prefetch path")
        return original(self, session, host_runs, device_blocks, cause, *args, **kwargs)
    Swapper.swap_in = swap_in


def io_wait_kills_engine():
    from djinnd.engine.pager import Pager
    original = Pager.on_phase

    def on_phase(self, s, phase, *args, **kwargs):
        if phase.value == "IO_WAIT":
            raise InjectedDeath("injected: the engine thread dies")
        return original(self, s, phase, *args, **kwargs)
    Pager.on_phase = on_phase


def forward_fails_on_marker():
    """A forward fails when it feeds token 499 (a marker in the test's prompt)."""
    from djinnd.engine.runner import Runner
    original = Runner.forward

    def forward(self, chunks, *args, **kwargs):
        if any(499 in s.tokens[s.num_cached:s.num_cached + n] for s, n in chunks):
            raise RuntimeError("injected fault: forward failed")
        return original(self, chunks, *args, **kwargs)
    Runner.forward = forward


def resume_never_gets_its_kv():
    """A resumed pause of a prompt holding token 498 never gets its KV back (the pool and the arena
    stay full of sessions nobody may evict): proceed() keeps answering 'not yet'."""
    from djinnd.engine.breakpoints import BreakpointRunner
    original = BreakpointRunner.proceed

    def proceed(self, s, *args, **kwargs):
        if 498 in s.tokens:
            return None
        return original(self, s, *args, **kwargs)
    BreakpointRunner.proceed = proceed


FAULTS = {"prefetch": prefetch_fails_once, "stuck_resume": resume_never_gets_its_kv, "die": io_wait_kills_engine, "forward": forward_fails_on_marker}

if __name__ == "__main__":
    for fault in sys.argv[1].split(","):
        FAULTS[fault]()
    sys.exit(cli.main(sys.argv[2:]))
