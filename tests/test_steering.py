"""Steering in the batch through a real daemon: steer={layer: vector} gives the tokens of the breakpoint
reference (a hook adding the vector at every forward), per session, concurrently; hooks that return
a tensor replace the states; stop_at_layer ends the forward; bad vectors are refused by name."""
import json
import subprocess
import sys
from array import array

import pytest
import torch

import libdjinn
from conftest import random_prompts

HIDDEN, LAYERS = 64, 4      # random:tiny
GEN = dict(max_new_tokens=10, ignore_eos=True)


def vector(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * scale


def reference(session, prompt, adds: dict, steps="all") -> list[int]:
    """Tokens with each vector added by a breakpoint hook (the general tool) in forwards `steps`."""
    hooks = {layer: (lambda v: lambda bp: bp.hidden.add_(v))(v) for layer, v in adds.items()}
    return session.generate(prompt_ids=prompt, hooks=hooks, hook_steps=steps, **GEN).tokens


def test_steered_tokens_equal_the_breakpoint_reference(tiny_daemon):
    [prompt] = random_prompts(512, [12], seed=41)
    adds = {1: vector(1), 3: vector(2)}
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        plain = djinn.session().generate(prompt_ids=prompt, **GEN).tokens
        steered = djinn.session().generate(prompt_ids=prompt, steer=adds, **GEN).tokens
        assert steered == reference(djinn.session(), prompt, adds)
        assert steered != plain           # the vectors are strong enough to matter
        again = djinn.session().generate(prompt_ids=prompt, **GEN).tokens
    assert again == plain                 # nothing of the steered request stays in the batch's table


def test_scale_and_positions_match_the_reference_on_those_forwards(tiny_daemon):
    [prompt] = random_prompts(512, [9], seed=42)
    v = vector(3)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        scaled = s.generate(prompt_ids=prompt, steer={2: libdjinn.Steer(v, scale=2.5)}, **GEN).tokens
        prompt_only = djinn.session().generate(prompt_ids=prompt, steer={2: libdjinn.Steer(v, positions="prompt")},
                                               **GEN).tokens
        generated = djinn.session().generate(prompt_ids=prompt, steer={2: libdjinn.Steer(v, positions="generated")},
                                             **GEN).tokens
        assert scaled == reference(djinn.session(), prompt, {2: v * 2.5})
        assert prompt_only == reference(djinn.session(), prompt, {2: v}, steps=[0])
        assert generated == reference(djinn.session(), prompt, {2: v}, steps=list(range(1, 10)))


def test_steering_continues_a_resident_history(tiny_daemon):
    """A second turn steers only its own tokens; the first turn's KV is reused as computed."""
    first, second = random_prompts(512, [10, 6], seed=43)
    v = vector(4)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        a, b = djinn.session(), djinn.session()
        a.generate(prompt_ids=first, **GEN)
        b.generate(prompt_ids=first, **GEN)
        steered = a.generate(prompt_ids=second, steer={0: v}, **GEN)
        expected = reference(b, second, {0: v})
    assert steered.cached_tokens > 0 and steered.tokens == expected


AGENT = """
import json, sys, libdjinn
socket_path, steer, prompt = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with libdjinn.connect(socket_path) as djinn:
    sessions = [djinn.session() for _ in range(3)]
    print("ready", flush=True)
    sys.stdin.readline()                 # all agents start together, so their rows share decode steps
    out = [s.generate(prompt_ids=prompt, max_new_tokens=10, ignore_eos=True,
                      steer={int(l): v for l, v in steer.items()}).tokens for s in sessions]
print(json.dumps(out))
"""


def test_concurrent_sessions_each_get_their_own_reference_tokens(tiny_daemon):
    """Four agent processes, each with its own vectors (one unsteered), decode in one batch."""
    prompts = random_prompts(512, [7, 11, 5, 9], seed=44)
    steers = [{0: vector(10), 2: vector(11)}, {1: vector(12)}, {}, {3: vector(13)}]
    procs = [subprocess.Popen([sys.executable, "-c", AGENT, tiny_daemon.socket,
                               json.dumps({l: v.tolist() for l, v in steer.items()}), json.dumps(p)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for steer, p in zip(steers, prompts)]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        before = djinn.status()["counters"]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        after = djinn.status()["counters"]
        steps = after["decode_steps"] - before.get("decode_steps", 0)
        assert (after["decode_tokens"] - before.get("decode_tokens", 0)) / steps > 1.5   # rows shared steps
        for steer, p, out in zip(steers, prompts, outputs):
            assert out == [reference(djinn.session(), p, steer)] * 3


def test_a_hook_that_returns_a_tensor_replaces_the_hidden_states(tiny_daemon):
    [prompt] = random_prompts(512, [8], seed=45)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        in_place = djinn.session().generate(prompt_ids=prompt, hooks={1: lambda bp: bp.hidden.mul_(-2.0)}, **GEN)
        returned = djinn.session().generate(prompt_ids=prompt, hooks={1: lambda bp: bp.hidden * -2.0}, **GEN)
        plain = djinn.session().generate(prompt_ids=prompt, **GEN)
        assert returned.tokens == in_place.tokens != plain.tokens
        with pytest.raises(libdjinn.BadRequest, match="shape"):
            djinn.session().generate(prompt_ids=prompt, hooks={1: lambda bp: bp.hidden[:1] * 2}, **GEN)
        with pytest.raises(TypeError, match="returned"):
            djinn.session().generate(prompt_ids=prompt, hooks={1: lambda bp: "not a tensor"}, **GEN)
        assert djinn.session().generate(prompt_ids=prompt, **GEN).tokens == plain.tokens   # daemon still fine


def test_stop_at_layer_ends_the_forward_and_leaves_the_history(tiny_daemon):
    first, second = random_prompts(512, [9, 5], seed=46)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s, fresh = djinn.session(), djinn.session()
        trace = s.trace(prompt_ids=first, breakpoints=[0, 1], stop_at_layer=1, **GEN)
        seen = [(bp.layer, bp.step, bp.shape[0]) for bp in trace]
        assert seen == [(0, 0, 9), (1, 0, 9)]
        assert trace.result.tokens == [] and trace.result.finish_reason == "stop_at_layer"
        bare = s.trace(prompt_ids=first, stop_at_layer=2, **GEN)     # no breakpoint: no pause at all
        assert list(bare) == [] and bare.result.tokens == []
        # nothing of the cut forwards stays: the session continues as if they never ran
        assert s.generate(prompt_ids=second, **GEN).tokens == fresh.generate(prompt_ids=second, **GEN).tokens
        with pytest.raises(libdjinn.BadRequest, match="after stop_at_layer"):
            list(s.trace(prompt_ids=first, breakpoints=[3], stop_at_layer=1))


@pytest.mark.parametrize("steer, match", [
    ({1: torch.zeros(HIDDEN + 1)}, "hidden size is 64"),
    ({1: torch.full((HIDDEN,), float("nan"))}, "NaN or infinity"),
    ({LAYERS: torch.zeros(HIDDEN)}, "out of range"),
    ({1: libdjinn.Steer(torch.zeros(HIDDEN), scale=float("inf"))}, "finite"),
    ({1: libdjinn.Steer(torch.zeros(HIDDEN), positions="middle")}, "positions"),
])
def test_bad_steering_is_refused_by_name(tiny_daemon, steer, match):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        with pytest.raises(libdjinn.BadRequest, match=match):
            s.generate(prompt_ids=[5, 6, 7], steer=steer, max_new_tokens=2)
        assert s.generate(prompt_ids=[5, 6, 7], max_new_tokens=2).tokens      # the session is untouched


def test_a_list_of_floats_is_accepted_on_the_wire(tiny_daemon):
    """Clients without numpy (or other languages) send the vector as a msgpack list of floats."""
    [prompt] = random_prompts(512, [6], seed=47)
    v = vector(5)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        final = djinn.request("generate", session=s.id, prompt_ids=prompt, **GEN,
                              steer=[{"layer": 2, "vector": v.tolist()}])
        assert final["tokens"] == djinn.session().generate(prompt_ids=prompt, steer={2: v}, **GEN).tokens


def test_steered_kv_never_reaches_another_session_with_the_same_prompt(tiny_daemon):
    """Prefix sharing hands out full KV blocks by their tokens: a steered session's must never be."""
    [prompt] = random_prompts(512, [40], seed=48)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        plain = djinn.session().generate(prompt_ids=prompt, **GEN).tokens
        steered = djinn.session().generate(prompt_ids=prompt, steer={0: vector(6)}, **GEN)
        later = djinn.session().generate(prompt_ids=prompt, **GEN).tokens
        captured = djinn.session().generate(prompt_ids=prompt, capture=[0], **GEN)
    assert steered.tokens != plain and later == plain
    assert captured.cached_tokens == 0 and captured.activations[0].shape[0] == 40 + 9



def test_the_openai_front_passes_steer_from_the_body_to_the_daemon():
    """`steer` in the request body (extra_body with the openai client) becomes the daemon's field, sent
    as a list of floats (test_a_list_of_floats_is_accepted_on_the_wire takes it from there)."""
    pytest.importorskip("pydantic")
    from libdjinn.openai.schemas import CompletionRequest
    body = {"model": "djinn", "prompt": "Hi", "steer": [{"layer": 3, "vector": [0.5, -1.0], "positions": "generated"}]}
    sampling = CompletionRequest.model_validate(body).daemon_sampling(8)
    assert sampling["steer"] == [{"layer": 3, "vector": [0.5, -1.0], "scale": 1.0, "positions": "generated"}]
    assert "steer" not in CompletionRequest.model_validate({"model": "djinn", "prompt": "Hi"}).daemon_sampling(8)
    with pytest.raises(ValueError, match="positions"):
        CompletionRequest.model_validate(body | {"steer": [{"layer": 3, "vector": [1.0], "positions": "middle"}]})


def test_decode_rows_keep_their_own_vectors_as_others_leave():
    """The batch's steering table follows its rows: a row moved into a leaver's place brings its
    vectors, the freed row is zero, and an unsteered session joining there adds nothing."""
    from djinnd.engine import commands as cmd
    from djinnd.engine.decode_batch import DecodeBatch
    from djinnd.engine.interventions import Interventions
    from djinnd.session import Request, SamplingParams, Session
    iv = Interventions(HIDDEN, torch.float32, "cpu")
    batch = DecodeBatch(4, 2, 0, "cpu", iv, LAYERS)
    sessions = [Session(i, 0, 0, tokens=[5, 6], block_table=[1]) for i in range(1, 5)]
    for s in sessions:
        s.request = Request(SamplingParams(), 1, 0)
    for s in sessions[:3]:
        spec = cmd.Interventions([cmd.SteerVector(s.id % LAYERS, array("f", [float(s.id)] * HIDDEN))])
        iv.start(s.id, spec, 0, 2, 4)
    batch.sync(sessions[:3], {s.id: 0 for s in sessions})
    batch.remove(1)                                   # row 0 leaves: session 3 moves into it
    iv.end(1)
    batch.sync(sessions[1:], {s.id: 0 for s in sessions})     # session 4 (unsteered) joins at row 2
    assert [s.id for s in batch.sessions] == [3, 2, 4]
    assert torch.equal(batch.steer[3, 0], torch.full((HIDDEN,), 3.0))
    assert torch.equal(batch.steer[2, 1], torch.full((HIDDEN,), 2.0))
    assert batch.steer[:, 2].abs().sum() == 0 and batch.steer[:, 3].abs().sum() == 0
    assert batch.steer[1].abs().sum() == 0            # session 1's layer: gone with it


def test_a_breakpoint_at_a_steered_layer_shows_the_steered_output(tiny_daemon):
    [prompt] = random_prompts(512, [6], seed=49)
    v = vector(8)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        plain = [bp.hidden.clone() for bp in djinn.session().trace(prompt_ids=prompt, breakpoints=[1], **GEN)]
        steered = [bp.hidden.clone() for bp in djinn.session().trace(prompt_ids=prompt, breakpoints=[1],
                                                                    steer={1: v}, **GEN)]
    assert torch.equal(steered[0], plain[0] + v)


def test_edited_kv_never_reaches_another_session_and_pauses_show_every_prompt_row(tiny_daemon):
    """Breakpoint edits change the KV too: a traced session shares no blocks, either way."""
    [prompt] = random_prompts(512, [40], seed=50)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        plain = djinn.session().generate(prompt_ids=prompt, **GEN).tokens       # its full blocks are cached
        rows = [bp.shape[0] for bp in djinn.session().trace(prompt_ids=prompt, breakpoints=[1], **GEN)]
        edited = djinn.session().generate(prompt_ids=prompt, hooks={0: lambda bp: bp.hidden.mul_(-1.0)}, **GEN)
        later = djinn.session().generate(prompt_ids=prompt, **GEN).tokens
    assert rows == [40] and edited.tokens != plain and later == plain
