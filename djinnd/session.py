"""Sessions: the vocabulary every part of the daemon shares. Imports no other djinnd module."""
import enum
import time
from dataclasses import dataclass, field


class SessionState(enum.Enum):
    IDLE = "idle"          # no work; its KV stays resident for the next turn
    WAITING = "waiting"    # has work, queued until the pool can take it
    RUNNING = "running"    # in the batch: prefilling or decoding
    PAUSED = "paused"      # stopped mid-forward at a breakpoint, waiting for its client


class Phase(enum.Enum):
    ACTIVE = "ACTIVE"      # has work or may soon
    IO_WAIT = "IO_WAIT"    # the agent is in a tool call


class KVPlace(enum.Enum):
    DEVICE = "device"      # in the device pool (or nothing cached yet)
    HOST = "host"          # swapped out to the host arena
    DROPPED = "dropped"    # thrown away; the next request prefills the whole history again


ALLOWED = {
    SessionState.IDLE: {SessionState.WAITING},
    SessionState.WAITING: {SessionState.RUNNING, SessionState.IDLE},
    SessionState.RUNNING: {SessionState.IDLE, SessionState.PAUSED},
    SessionState.PAUSED: {SessionState.RUNNING},
}


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    breakpoints: list = field(default_factory=list)   # (layer, steps or None for every step)

    @property
    def has_decode_breakpoints(self) -> bool:
        """A pause may come after the prompt's forward (so decode steps cannot run ahead)."""
        return any(steps is None or any(step > 0 for step in steps) for _, steps in self.breakpoints)

    def breakpoint_layers(self, step: int) -> list[int]:
        """Layers to pause after in forward number `step` (0: the prompt's, then one per token)."""
        return sorted({layer for layer, steps in self.breakpoints if steps is None or step in steps})


@dataclass
class Request:
    """One generate call in flight on a session."""
    params: SamplingParams
    num_prompt_tokens: int
    num_cached: int               # history whose KV was resident when the request came
    kv_at_arrival: str = "resident"   # resident, prefetched, swapped or dropped
    output: list[int] = field(default_factory=list)
    queued_at: float = field(default_factory=time.monotonic)
    started: bool = False         # its first forward has run (queue wait is measured up to it)


@dataclass
class Session:
    id: int
    owner: int                    # the connection that opened it
    owner_pid: int
    tokens: list[int] = field(default_factory=list)
    num_cached: int = 0           # tokens whose K/V are written in the block table's blocks
    block_table: list[int] = field(default_factory=list)
    block_keys: list = field(default_factory=list)  # content keys of its leading blocks the prefix cache knows
    prefix_root: bytes | None = None                # where its keys start (who it may share with); None: no sharing
    token_keys: list = field(default_factory=list)  # (end, key) of its full blocks of tokens, hashed once (prefix cache)
    state: SessionState = SessionState.IDLE
    phase: Phase = Phase.ACTIVE
    request: Request | None = None
    kv: KVPlace = KVPlace.DEVICE
    host_runs: list = field(default_factory=list)   # (start, length) runs in the host arena
    last_used: float = field(default_factory=time.monotonic)
    prefetch_at: float | None = None                # semantic: when to bring the KV back (monotonic s)
    expected_back: float | None = None              # IO_WAIT: when the tool is expected back (monotonic s)
    io_wait_since: float | None = None              # IO_WAIT: when the tool call began (to learn durations)
    hinted: bool = False                            # IO_WAIT: the agent said how long (expected_s)
    tool: str | None = None                         # IO_WAIT: the tool's name, if the agent gave one
    transfers: list = field(default_factory=list)   # copies in flight that touch this session's KV
    prefetched: bool = False                        # KV came back by prefetch since the last request
    paused: object = None                           # the held forward while PAUSED (engine/breakpoints.py)

    def cut_tokens(self, keep: int):
        """History past `keep` goes, with the keys of blocks that reached past it."""
        del self.tokens[keep:]
        while self.token_keys and self.token_keys[-1][0] > keep:
            self.token_keys.pop()

    @property
    def num_new_tokens(self) -> int:
        """Tokens the next forward must feed (the whole uncached tail)."""
        return len(self.tokens) - self.num_cached

    def change_state(self, new: SessionState):
        if new not in ALLOWED[self.state]:
            raise RuntimeError(f"session {self.id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new
