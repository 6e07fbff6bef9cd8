"""One generate on a conversation's daemon session: text deltas as tokens stream, cut at stop
strings, tool calls parsed at the end, and the exact tokens the session then holds recorded.

A reply cut at a stop string does not stop the daemon unless the session can `cancel`; the rest of
the turn is then drained on a thread, and the conversation is recorded when the daemon is done.
"""
import threading
from dataclasses import dataclass

from libdjinn.client import DjinnError, raise_for
from libdjinn.openai import tool_calls
from libdjinn.openai.stops import StopMatcher


@dataclass
class Outcome:
    content: str | None
    tool_calls: list
    finish_reason: str            # stop, length or tool_calls
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class TextStream:
    """Decoded text of the generated tokens; what is safe to send never holds part of a stop string,
    nor anything from a tool call on (parsed at the end instead)."""

    def __init__(self, tokenizer, stops: list[str], tools: bool, forced: str):
        self.tokenizer, self.tools, self.forced = tokenizer, tools, forced
        self.stops = StopMatcher(stops)
        self.ids, self.text, self.sent, self.stopped = [], "", 0, False

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # half of a UTF-8 character
            return ""
        self.text = text
        hit = self.stops.feed(text)
        hits = [] if hit is None else [hit]
        end = tool_calls.call_end(self.forced, text) if self.forced else None
        if end is not None:                                # the forced call is complete
            hits.append(end)
        if hits:
            self.text, self.stopped = text[:min(hits)], True
        return self._emit(len(self.text) if self.stopped and not self.tools else self._safe_end())

    def _safe_end(self) -> int:
        text, end = self.text, len(self.text)
        if self.forced or self.tools and text.lstrip()[:1] in ("", "{", "["):
            return self.sent                  # may be a tool call: hold it all
        end -= self.stops.held
        if self.tools and tool_calls.OPEN in text:
            end = min(end, text.index(tool_calls.OPEN))
        elif self.tools:
            s = tool_calls.OPEN
            end = min(end, len(text) - next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                                             if text.endswith(s[:k])), 0))
        return max(end, self.sent)

    def _emit(self, end: int) -> str:
        delta, self.sent = self.text[self.sent:end], max(end, self.sent)
        return delta


class Turn:
    def __init__(self, front, conv, ids: list[int], keep: int, sampling: dict, stream: TextStream):
        self.front, self.conv, self.ids, self.keep = front, conv, ids, keep
        self.sampling, self.stream = sampling, stream
        self.done: dict | None = None
        self.reply_start = len(ids)        # where this turn's reply begins in the session's tokens

    def events(self):
        """Yield text deltas, then the Outcome."""
        session, suffix = self.conv.session, self.ids[self.keep:]
        replies = session.conn.replies("generate", session=session.id, prompt_ids=suffix, keep_tokens=self.keep,
                                       stream=True, **self.sampling)
        try:
            for reply in replies:
                raise_for(reply)
                if reply["type"] != "token":
                    self.done = reply
                    break
                delta = self.stream.push(reply["token"])
                if delta:
                    yield delta
                if self.stream.stopped:
                    self._cancel(replies)
                    break
            yield self._outcome()
        except DjinnError:
            self.done = {"tokens": None}
            raise
        except ConnectionError as e:
            self.done = {"tokens": None}
            self.front.link.lost(e)
        finally:
            self._finish(replies)

    def _cancel(self, replies):
        cancel = getattr(self.conv.session, "cancel", None)
        if cancel is None:
            return                          # the daemon runs to max_tokens; _finish drains it
        cancel()
        for reply in replies:
            if reply["type"] not in ("token", "paused"):
                self.done = reply if reply["type"] == "done" else {"tokens": None}

    def _outcome(self) -> Outcome:
        s = self.stream
        content, calls = tool_calls.parse(s.text, s.forced) if s.tools else (s.text, [])
        if calls:
            self.front.note_tool_calls(self.conv, calls)
        ended = (self.done or {}).get("finish_reason")
        reason = "tool_calls" if calls else "stop" if s.stopped or ended == "stop" else "length"
        cached = self.done["cached_tokens"] if self.done else min(self.keep, max(0, len(self.conv.tokens) - 1))
        return Outcome(content, calls, reason, len(self.ids), len(s.ids), cached)

    def _finish(self, replies):
        if self.done is not None:
            self._record()
        else:                               # cut short: the daemon is still generating
            self.conv.draining = True
            if self.conv.tool_wait:
                self.front.enter_io_wait(self.conv)
            threading.Thread(target=self._drain, args=(replies,), daemon=True).start()

    def _drain(self, replies):
        try:
            for reply in replies:
                if reply["type"] not in ("token", "paused"):
                    self.done = reply if reply["type"] == "done" else {"tokens": None}
        except Exception:
            self.done = {"tokens": None}
        self._record()

    def _record(self):
        tokens = self.done.get("tokens")
        if self.done.get("finish_reason") == "cancelled":
            held = self.ids[:self.keep]     # a cancelled request leaves the session's history as before it
        else:
            held = None if tokens is None else self.ids + tokens
        if held is not None and self.conv.tool_wait:
            self.front.enter_io_wait(self.conv)        # now that it is idle, its KV can move
        self.front.release(self.conv, held, self.reply_start)
