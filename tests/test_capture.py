"""Capture and harvest through a real daemon: captured layer outputs equal the hidden states breakpoints
show, arrive token by token to a streaming reader, stay in the owner's own 0600 segment, and harvest
gives the same rows for many prompts in one batched forward cut after the deepest layer."""
import os
import stat
import threading

import pytest
import torch

import libdjinn
from conftest import random_prompts, start_daemon, stop_daemon

GEN = dict(max_new_tokens=7, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory):
    """random:tiny with a 64-token step budget: longer prompts are prefilled in chunks."""
    d = start_daemon(tmp_path_factory.mktemp("capture"), "--model", "random:tiny", "--kv-cache-mb", "4",
                     "--max-num-batched-tokens", "64")
    yield d
    stop_daemon(d)


def breakpoint_rows(session, prompt, layers, adds=None) -> dict:
    """Each layer's output for the prompt and every generated token, as breakpoints show it."""
    rows = {layer: [] for layer in layers}
    trace = session.trace(prompt_ids=prompt, breakpoints=layers, steps="all", **GEN)
    for bp in trace:
        if adds and bp.layer in adds:
            bp.hidden.add_(adds[bp.layer])
        rows[bp.layer].append(bp.hidden.clone())
    return {layer: torch.cat(r) for layer, r in rows.items()}, trace.result.tokens


def test_captures_equal_the_hidden_states_breakpoints_show(tiny_daemon):
    [prompt] = random_prompts(512, [13], seed=51)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        g = djinn.session().generate(prompt_ids=prompt, capture=[0, 3], **GEN)
        expected, tokens = breakpoint_rows(djinn.session(), prompt, [0, 3])
    assert g.tokens == tokens
    for layer in (0, 3):       # 13 prompt rows, then one per generated token fed back (6 of 7)
        assert g.activations[layer].shape == (13 + 6, 64)
        torch.testing.assert_close(g.activations[layer], expected[layer], rtol=1e-5, atol=1e-5)
    assert g.activations.numpy(3).shape == (19, 64)


def test_a_prompt_prefilled_in_chunks_is_captured_whole(tiny_daemon):
    [prompt] = random_prompts(512, [150], seed=57)             # chunks of 64, 64, 22
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        g = djinn.session().generate(prompt_ids=prompt, capture=[2], **GEN)
        h = djinn.harvest([prompt], layers=[2])                   # one forward, no chunks
    assert g.activations[2].shape == (150 + 6, 64)
    torch.testing.assert_close(g.activations[2][:150], h[2], rtol=1e-5, atol=1e-5)


def test_capture_sees_the_steered_output_of_its_layer(tiny_daemon):
    [prompt] = random_prompts(512, [8], seed=52)
    v = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 3
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        g = djinn.session().generate(prompt_ids=prompt, steer={1: v}, capture=[1, 2], **GEN)
        expected, tokens = breakpoint_rows(djinn.session(), prompt, [1, 2], adds={1: v})
    assert g.tokens == tokens
    for layer in (1, 2):
        torch.testing.assert_close(g.activations[layer], expected[layer], rtol=1e-5, atol=1e-5)


def test_a_streaming_reader_sees_each_tokens_rows_when_the_token_arrives(tiny_daemon):
    [prompt] = random_prompts(512, [10], seed=53)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        seen = []
        for k, event in enumerate(djinn.session().stream(prompt_ids=prompt, capture=[2], **GEN), start=1):
            rows = event.activations[2]
            assert rows.shape[0] == 10 + k - 1
            seen.append(rows[-1].clone())            # the row written before this token was sent
        final = djinn.session().generate(prompt_ids=prompt, capture=[2], **GEN).activations[2]
    torch.testing.assert_close(torch.stack(seen), final[9:], rtol=1e-5, atol=1e-5)


def test_concurrent_captures_stay_in_their_own_sessions_segments(tiny_daemon):
    prompts = random_prompts(512, [9, 14, 6], seed=54)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        alone = [djinn.session().generate(prompt_ids=p, capture=[1], **GEN).activations[1].clone() for p in prompts]
        results = [None] * 3

        def agent(i):
            with libdjinn.connect(tiny_daemon.socket) as own:
                results[i] = own.session().generate(prompt_ids=prompts[i], capture=[1], **GEN)
        threads = [threading.Thread(target=agent, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    names = {r.activations._mapped.desc["segment"] for r in results}
    assert len(names) == 3
    for r, expected in zip(results, alone):
        torch.testing.assert_close(r.activations[1], expected, rtol=1e-5, atol=1e-5)


def test_the_capture_segment_is_the_owners_alone_and_goes_with_the_session(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        g = s.generate(prompt_ids=[5, 6, 7], capture=[0], max_new_tokens=2)
        path = "/dev/shm" + g.activations._mapped.desc["segment"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        s.close()
        assert not os.path.exists(path)
        assert g.activations[0].shape == (4, 64)      # the mapping outlives the name


def test_bad_capture_layers_are_refused(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        with pytest.raises(libdjinn.BadRequest, match="out of range"):
            djinn.session().generate(prompt_ids=[5, 6], capture=[4])
        with pytest.raises(libdjinn.BadRequest, match="twice"):
            djinn.session().generate(prompt_ids=[5, 6], capture=[1, 1])
        with pytest.raises(libdjinn.BadRequest, match="out of range"):
            djinn.harvest([[5, 6]], layers=[9])


def test_harvest_gives_each_prompts_rows_in_one_batched_forward(tiny_daemon):
    prompts = random_prompts(512, [12, 3, 30, 7], seed=55)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        before = djinn.status()["counters"]
        h = djinn.harvest(prompts, layers=[1, 2])
        after = djinn.status()["counters"]
        for i, p in enumerate(prompts):
            expected, _ = breakpoint_rows(djinn.session(), p, [1, 2])
            for layer in (1, 2):
                torch.testing.assert_close(h.prompt(i, layer), expected[layer][:len(p)], rtol=1e-5, atol=1e-5)
    assert h[2].shape == (sum(map(len, prompts)), 64)
    assert after["harvest_tokens"] - before.get("harvest_tokens", 0) == 52
    assert after.get("sessions_opened") == before.get("sessions_opened")      # no session involved


def test_harvest_splits_prompts_over_the_daemons_limit(tiny_daemon):
    """More tokens than one forward takes: several calls, one result, every row in place."""
    prompts = random_prompts(512, [30] * 5, seed=56)          # 150 tokens; the daemon takes 64 a call
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        h = djinn.harvest(prompts, layers=[0])
        single = djinn.harvest([prompts[4]], layers=[0])
    assert len(h._parts) == 3 and h[0].shape == (150, 64)
    torch.testing.assert_close(h.prompt(4, 0), single[0], rtol=1e-5, atol=1e-5)


def test_a_harvest_over_several_sub_batches_equals_one_prompt_at_a_time(tiny_daemon):
    """The daemon runs a call as sub-batches of 16 tokens here (a quarter of its 64): each prompt's rows,
    at every layer asked for and in the order asked, are those it gets alone."""
    prompts = random_prompts(512, [5, 9, 20, 3, 14, 1, 8], seed=58)       # 6 sub-batches, one call
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        h = djinn.harvest(prompts, layers=[3, 0])
        alone = [djinn.harvest([p], layers=[3, 0]) for p in prompts]
        assert len(h._parts) == 1
        for i, single in enumerate(alone):
            for layer in (0, 3):
                torch.testing.assert_close(h.prompt(i, layer), single[layer], rtol=1e-5, atol=1e-5)


def test_a_write_failing_mid_harvest_leaves_no_blocks_segment_or_thread(monkeypatch):
    """The segment's third write fails (tmpfs full): a clear error, every KV block back in the pool, no
    segment left or charged, no writer thread left; the next harvest works."""
    from djinnd.config import load_config
    from djinnd.daemon import build_engine
    from djinnd.engine import segment_writer
    from djinnd.engine.commands import EngineError
    engine = build_engine(load_config(None, {"model": "random:tiny", "device": "cpu", "dtype": "float32",
                                             "kv_cache_mb": 2.0, "max_num_batched_tokens": 64}))
    harvester, pool, prompts = engine.harvester, engine.pool, random_prompts(512, [20, 20, 20], seed=59)
    free, shm = pool.num_free, set(os.listdir("/dev/shm"))
    writes, pwrite_all = [], segment_writer.pwrite_all

    def failing(fd, data, offset):
        writes.append(offset)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        pwrite_all(fd, data, offset)
    monkeypatch.setattr(segment_writer, "pwrite_all", failing)
    with pytest.raises(EngineError, match="No space left"):
        harvester.run(1, prompts, [0, 1])
    assert pool.num_free == free and not harvester.segments and set(os.listdir("/dev/shm")) == shm
    assert engine.quota.by_owner[1] == 0
    assert not [t for t in threading.enumerate() if t.name == "djinn-harvest-writer"]
    monkeypatch.setattr(segment_writer, "pwrite_all", pwrite_all)
    assert harvester.run(1, prompts, [0, 1])["tensor"]["shape"] == [2, 60, 64]
    assert pool.num_free == free
    harvester.close()
    engine.close_weights()


def test_capture_and_harvest_segments_count_against_the_clients_quota(tmp_path):
    """A client cannot fill /dev/shm with captures or harvests: past its cap it gets LimitReached."""
    d = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "4", "--max-segment-mb-per-client", "0.5")
    try:
        with libdjinn.connect(d.socket) as djinn:
            s = djinn.session()              # 4 layers x 1,022 rows x 64 x 4 bytes = 1.0 MiB > 0.5
            with pytest.raises(libdjinn.LimitReached, match="max_segment_mb_per_client"):
                s.generate(prompt_ids=[5, 6], capture=[0, 1, 2, 3], max_new_tokens=1020)
            small = s.generate(prompt_ids=[5, 6], capture=[0], max_new_tokens=4)     # 6 rows: fine
            used = djinn.status()["memory"]["kv_blocks_used"]
            with pytest.raises(libdjinn.LimitReached, match="max_segment_mb_per_client"):
                djinn.harvest([[5] * 1000] * 2, layers=[0, 1, 2], max_batch_tokens=2000)
            assert djinn.status()["memory"]["kv_blocks_used"] == used        # the borrowed blocks are back
            assert small.activations[0].shape == (5, 64)
    finally:
        stop_daemon(d)
