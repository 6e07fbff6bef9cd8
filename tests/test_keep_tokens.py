"""generate(keep_tokens=k): the session first cuts its history to k tokens, frees the KV past them,
then continues; the tokens equal a fresh session fed the same ids."""
import time

import pytest

import libdjinn
from conftest import random_prompts, start_daemon, stop_daemon

TINY_VOCAB = 512
GREEDY = {"max_new_tokens": 6, "ignore_eos": True}


def fresh_tokens(djinn, ids) -> list[int]:
    s = djinn.session()
    try:
        return s.generate(prompt_ids=ids, **GREEDY).tokens
    finally:
        s.close()


def session_row(djinn, sid) -> dict:
    return next(r for r in djinn.status()["sessions"] if r["id"] == sid)


def test_truncated_continuation_equals_a_fresh_session(tiny_daemon):
    first, second = random_prompts(TINY_VOCAB, [40, 5], seed=11)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        turn1 = s.generate(prompt_ids=first, **GREEDY)
        keep = len(first) - 9          # diverge inside the first prompt, across a block boundary
        turn2 = s.generate(prompt_ids=second, keep_tokens=keep, **GREEDY)
        assert turn2.cached_tokens == keep
        assert turn2.tokens == fresh_tokens(djinn, first[:keep] + second)
        row = session_row(djinn, s.id)
        assert row["tokens"] == keep + len(second) + 6
        assert row["kv_blocks"] == -(-row["tokens"] // 16)       # nothing past the history is held
        keep3 = keep + len(second) + 2                            # now inside turn 2's reply
        turn3 = s.generate(prompt_ids=second, keep_tokens=keep3, **GREEDY)
        assert turn3.tokens == fresh_tokens(djinn, first[:keep] + second + turn2.tokens[:2] + second)
        assert turn1.tokens                                        # turn 1 ran normally


@pytest.fixture(scope="module")
def evicting_daemon(tmp_path_factory):
    """evict_low_water 1: an IO_WAIT session's KV leaves for the host arena at once (between steps)."""
    d = start_daemon(tmp_path_factory.mktemp("evicting"), "--model", "random:tiny", "--kv-cache-mb", "4",
                     "--evict-low-water", "1")
    yield d
    stop_daemon(d)


def test_truncation_of_a_swapped_out_session(evicting_daemon):
    first, second = random_prompts(TINY_VOCAB, [35, 4], seed=12)
    with libdjinn.connect(evicting_daemon.socket) as djinn:
        s = djinn.session()
        s.generate(prompt_ids=first, **GREEDY)
        s.signal_phase("IO_WAIT")
        deadline = time.time() + 10
        while session_row(djinn, s.id)["kv_where"] not in ("host", "->host"):
            assert time.time() < deadline, "the IO_WAIT session was not evicted"
            time.sleep(0.02)
        turn2 = s.generate(prompt_ids=second, keep_tokens=20, **GREEDY)
        assert turn2.cached_tokens == 20
        assert turn2.tokens == fresh_tokens(djinn, first[:20] + second)


def test_bad_keep_tokens_is_refused_and_the_session_keeps_serving(tiny_daemon):
    first, second = random_prompts(TINY_VOCAB, [10, 3], seed=13)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        turn1 = s.generate(prompt_ids=first, **GREEDY)
        for bad in (-1, len(first) + 7):
            with pytest.raises(libdjinn.BadRequest, match="keep_tokens"):
                s.generate(prompt_ids=second, keep_tokens=bad, **GREEDY)
        turn2 = s.generate(prompt_ids=second, **GREEDY)
        assert turn2.tokens == fresh_tokens(djinn, first + turn1.tokens + second)
