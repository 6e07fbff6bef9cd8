"""Tokens from the engine equal HF transformers' greedy generate, alone and batched together."""
import pytest

from conftest import hf_greedy, hf_reference, random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient


class EngineClient(LocalClient):
    def __init__(self, **overrides):
        super().__init__(build_engine(load_config(None, {"device": "cpu", **overrides})))
        self.engine.start()

    def done(self, events):
        return LocalClient.done(events)[0]


@pytest.fixture(scope="module", params=["random:tiny", "smollm2-135m"])
def engine(request):
    client = EngineClient(model=request.param, kv_cache_mb=64.0)
    yield client, hf_reference(client.engine.loaded.model)
    client.engine.stop()


def test_single_session_matches_hf(engine):
    client, hf = engine
    [prompt] = random_prompts(client.engine.loaded.model.args.vocab_size, [11])
    out = client.done(client.submit(client.open(), prompt, 16)).tokens
    assert out == hf_greedy(hf, prompt, 16)


def test_batched_sessions_of_different_lengths_match_hf(engine):
    client, hf = engine
    prompts = random_prompts(client.engine.loaded.model.args.vocab_size, [3, 17, 40, 9], seed=1)
    pending = [client.submit(client.open(), p, 12) for p in prompts]
    outs = [client.done(e).tokens for e in pending]
    assert client.engine.metrics.counters["decode_steps"] > 0
    for prompt, out in zip(prompts, outs):
        assert out == hf_greedy(hf, prompt, 12)


def test_second_turn_continues_resident_kv(engine):
    """A second generate feeds only the new prompt; tokens equal HF on the whole history."""
    client, hf = engine
    first, second = random_prompts(client.engine.loaded.model.args.vocab_size, [8, 6], seed=2)
    session = client.open()
    turn1 = client.done(client.submit(session, first, 5))
    turn2 = client.done(client.submit(session, second, 7))
    history = first + turn1.tokens
    assert turn2.cached_tokens == len(history) - 1   # all but the last sampled token were resident
    assert turn2.prompt_tokens == len(second)
    assert turn2.tokens == hf_greedy(hf, history + second, 7)


def test_cpu_decode_hands_out_each_token_in_the_step_that_computed_it(engine):
    """On CPU a decode step is done when it returns: n new tokens take n - 1 decode steps, none
    holding a token back a step or computing one past the request's end (as a GPU step in flight does)."""
    client, _ = engine
    [prompt] = random_prompts(client.engine.loaded.model.args.vocab_size, [7], seed=3)
    before = client.engine.metrics.counters.get("decode_steps", 0)
    client.done(client.submit(client.open(), prompt, 10))
    client.open()                  # a round trip through the inbox: the step that sent Done has ended
    assert client.engine.metrics.counters["decode_steps"] - before == 9


def test_stops_on_eos_like_hf():
    client = EngineClient(model="smollm2-135m", kv_cache_mb=16.0)
    hf = hf_reference(client.engine.loaded.model)
    tok = client.engine.loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                     add_generation_prompt=True, return_dict=False)
    done = client.done(client.submit(client.open(), prompt, 40, ignore_eos=False))
    client.engine.stop()
    assert done.finish_reason == "stop" and done.tokens[-1] == tok.eos_token_id
    assert done.tokens == hf_greedy(hf, prompt, 40, ignore_eos=False)
