"""The embedded default model through a real daemon: chat text equals HF transformers, turns
continue the resident KV, and the example agent runs as its own process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import libdjinn
from conftest import ROOT, hf_greedy, hf_reference, start_daemon, stop_daemon
from djinnd.model.loader import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("embedded"), "--kv-cache-mb", "32")
    yield d
    stop_daemon(d)


@pytest.fixture(scope="module")
def reference():
    loaded = load_model("smollm2-135m", 0, torch.float32, "cpu")
    return hf_reference(loaded.model), loaded.tokenizer


def test_chat_turns_match_hf_on_the_same_tokens(daemon, reference):
    hf, tok = reference
    question, follow_up = "What is the capital of France?", "And of Italy?"
    with libdjinn.connect(daemon.socket) as djinn:
        session = djinn.session()
        first = session.chat(question, max_new_tokens=24)
        second = session.chat(follow_up, max_new_tokens=24)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_dict=False)
    expected = hf_greedy(hf, ids, 24, ignore_eos=False)
    assert first.tokens == expected and first.text == tok.decode(expected, skip_special_tokens=True)
    # turn two feeds only what the template adds after the resident history
    delta = f"\n<|im_start|>user\n{follow_up}<|im_end|>\n<|im_start|>assistant\n"
    history = ids + first.tokens + tok.encode(delta, add_special_tokens=False)
    assert second.cached_tokens == len(ids) + len(first.tokens) - 1
    assert second.tokens == hf_greedy(hf, history, 24, ignore_eos=False)


def test_streamed_text_adds_up_to_the_final_text(daemon):
    with libdjinn.connect(daemon.socket) as djinn:
        pieces = [e.text for e in djinn.session().stream(messages=[{"role": "user", "content": "Say hello."}],
                                                         max_new_tokens=16)]
        whole = djinn.session().chat("Say hello.", max_new_tokens=16).text
    assert "".join(pieces) == whole and whole


def test_example_tool_agent_runs_as_a_process(daemon):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "agents", "tool_agent.py"), "--json", "--socket",
                          daemon.socket, "--task", "What is 6 * 7?", "--tool-seconds", "0.1",
                          "--max-new-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tool"] == {"calculator": "6 * 7", "result": "42"}
    assert result["answer"] and result["history_reused_tokens"] > 0
