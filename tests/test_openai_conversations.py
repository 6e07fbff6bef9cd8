"""The front's conversation table and tool-call text, in process: prefix matching, TTL, cap; the
fallback tool format renders and parses back."""
import json
import time

import pytest

from libdjinn.openai import tool_calls
from libdjinn.openai.conversations import Conversation, ConversationTable, TooManyConversations


def finished(table, session, tokens, reply_start):
    conv = Conversation(session)
    table.add(conv)
    table.release(conv, tokens, reply_start)
    return conv


def test_longest_matching_history_continues_and_a_divergence_before_the_reply_does_not():
    table = ConversationTable(ttl_s=60, max_conversations=8)
    a = finished(table, "a", [1, 2, 3, 4, 5, 6], reply_start=4)
    b = finished(table, "b", [1, 2, 9, 9], reply_start=3)
    assert table.claim([1, 2, 3, 4, 5, 6, 7]) == (a, 6)           # extends a
    table.release(a, [1, 2, 3, 4, 5, 6, 7, 8], 7)
    assert table.claim([1, 2, 3, 4, 5, 6, 7, 0, 1]) == (a, 7)     # diverges inside a's reply: cut there
    assert table.claim([1, 2, 9, 9, 1]) == (b, 4)
    assert table.claim([1, 2, 3]) == (None, 0)                    # shares only a's prompt: a new one


def test_idle_conversations_expire_and_the_cap_pushes_out_the_least_recent():
    table = ConversationTable(ttl_s=0.05, max_conversations=2)
    old = finished(table, "old", [1], 1)
    recent = finished(table, "recent", [2], 1)
    new = Conversation("new")
    assert table.add(new) == [old]                 # at the cap: the least recently used idle one goes
    assert table.add(Conversation("x")) == [recent]
    with pytest.raises(TooManyConversations):      # both busy: the table never grows past its cap
        table.add(Conversation("y"))
    table.release(new, [3], 1)
    time.sleep(0.1)
    assert table.expire() == [new] and len(table.items) == 1


def test_fallback_tool_format_round_trips():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    text = tool_calls.call_text(call)
    content, calls = tool_calls.parse("Let me add. " + text)
    assert content == "Let me add." and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert tool_calls.parse('{"name": "add", "arguments": {"a": 1}}')[1][0]["function"]["name"] == "add"
    assert tool_calls.parse("no call here") == ("no call here", [])
    forced = tool_calls.forced_prefix({"type": "function", "function": {"name": "add"}})
    assert json.loads(tool_calls.parse('{"a": 3}}\n</tool_call>', forced)[1][0]["function"]["arguments"]) == {"a": 3}
