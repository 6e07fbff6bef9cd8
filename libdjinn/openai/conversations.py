"""Conversations: which daemon session holds which token history, found again by token prefix.

A request is rendered to token ids; the idle conversation sharing the longest prefix with them
continues (its KV stays resident; only the new suffix is sent). It must match at least up to where
its last reply began: a divergence inside that reply (templates re-render assistant turns) is cut
with keep_tokens, one further back is another conversation. Idle ones expire after a TTL, and the
table holds at most a fixed number, so memory stays bounded.
"""
import threading
import time
from dataclasses import dataclass, field


class TooManyConversations(Exception):
    pass


@dataclass(eq=False)      # identity: two conversations may hold the same tokens
class Conversation:
    session: object                   # a libdjinn.Session
    tokens: list[int] = field(default_factory=list)   # exactly what the daemon session holds
    reply_start: int = 0              # where its last reply began
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False                # a request is using it
    draining: bool = False            # its reply went out; the daemon is still finishing the turn
    tool_wait: tuple | None = None    # (tool names called, time.monotonic() of the reply)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationTable:
    def __init__(self, ttl_s: float, max_conversations: int):
        self.ttl_s, self.max_conversations = ttl_s, max_conversations
        self.items: list[Conversation] = []
        self._cond = threading.Condition()

    def claim(self, ids: list[int], wait_s: float = 30.0) -> tuple[Conversation | None, int]:
        """The best conversation for `ids` (now busy) and how many of its tokens match, or (None, 0).
        A conversation still draining its last turn is worth waiting for: it is this one's past."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                best, matched = self._best(ids)
                if best is None or not best.busy:
                    break
                if not self._cond.wait(deadline - time.monotonic()):
                    return None, 0
            if best is not None:
                best.busy = True
            return best, matched

    def _best(self, ids):
        best, matched = None, 0
        for c in self.items:
            n = common_prefix(c.tokens, ids)
            usable = n >= c.reply_start and (not c.busy or c.draining)
            if usable and (n > matched or n == matched and best and c.last_used > best.last_used):
                best, matched = c, n
        return best, matched

    def add(self, conv: Conversation) -> list[Conversation]:
        """Insert a busy conversation; returns the idle ones pushed out by the cap (to close)."""
        with self._cond:
            out = []
            while len(self.items) >= self.max_conversations:
                idle = [c for c in self.items if not c.busy]
                if not idle:
                    raise TooManyConversations(f"all {self.max_conversations} conversations are busy")
                victim = min(idle, key=lambda c: c.last_used)
                self.items.remove(victim)
                out.append(victim)
            conv.busy = True
            self.items.append(conv)
            return out

    def release(self, conv: Conversation, tokens: list[int] | None, reply_start: int = 0):
        """The daemon finished a turn: record what the session holds (None: unknown, forget it)."""
        with self._cond:
            if tokens is None:
                self.items = [c for c in self.items if c is not conv]
            else:
                conv.tokens, conv.reply_start = tokens, reply_start
            conv.busy = conv.draining = False
            conv.last_used = time.monotonic()
            self._cond.notify_all()

    def expire(self) -> list[Conversation]:
        """Remove and return the idle conversations past their TTL (to close)."""
        now = time.monotonic()
        with self._cond:
            old = [c for c in self.items if not c.busy and now - c.last_used > self.ttl_s]
            self.items = [c for c in self.items if c not in old]
            return old

    def clear(self) -> list[Conversation]:
        with self._cond:
            gone, self.items = self.items, []
            self._cond.notify_all()
            return gone
