"""djinn-openai: a real djinnd, a real front process on a loopback port, the official openai client.
Replies are compared with a direct libdjinn session fed the same token ids."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import libdjinn
from conftest import ROOT, start_daemon, stop_daemon
from libdjinn.openai import tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Front:
    def __init__(self, daemon_socket: str, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "libdjinn.openai", "--socket", daemon_socket,
                                      "--listen", f"127.0.0.1:{self.port}", *flags], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while not self._up():
            assert self.proc.poll() is None and time.time() < deadline, self.proc.stdout.read()
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def _up(self) -> bool:
        try:
            return httpx.get(self.url + "/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("openai"), "--kv-cache-mb", "64")   # the embedded model
    yield d
    stop_daemon(d)


@pytest.fixture(scope="module")
def front(daemon):
    f = Front(daemon.socket)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def direct(daemon):
    with libdjinn.connect(daemon.socket) as djinn:
        yield djinn


def direct_reply(djinn, ids, max_new_tokens) -> list[int]:
    s = djinn.session()
    try:
        return s.generate(prompt_ids=ids, max_new_tokens=max_new_tokens).tokens
    finally:
        s.close()


def tokenizer(djinn):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(djinn.info["tokenizer_dir"])


def chat_ids(tok, messages, tools=None) -> list[int]:
    return tok.encode(tool_calls.render(tok, messages, tools), add_special_tokens=False)


def test_chat_stream_and_whole_agree_with_a_direct_session(front, direct):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = front.client.chat.completions.create(model="djinn", messages=messages, max_tokens=12, temperature=0)
    chunks = list(front.client.chat.completions.create(model="djinn", messages=messages, max_tokens=12,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True}))
    tok = tokenizer(direct)
    expected = direct_reply(direct, chat_ids(tok, messages), 12)
    assert whole.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == len(expected)
    assert whole.usage.prompt_tokens == len(chat_ids(tok, messages))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_a_stream_sends_each_delta_while_the_daemon_is_still_generating(front, direct):
    """Deltas go out as tokens come, not all at the end: when the first one arrives, the
    daemon is still running the request."""
    messages = [{"role": "user", "content": "Count from one to twenty in words."}]
    stream = front.client.chat.completions.create(model="djinn", messages=messages, max_tokens=24, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
    states_at_first, text = None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta and states_at_first is None:
            states_at_first = [r["state"] for r in direct.status()["sessions"]]
        text += delta or ""
    assert "running" in states_at_first and text


def test_completions_models_stop_strings(front, direct):
    assert [m.id for m in front.client.models.list().data] == ["djinn"]
    tok = tokenizer(direct)
    r = front.client.completions.create(model="djinn", prompt="Once upon a time", max_tokens=10, temperature=0)
    expected = tok.decode(direct_reply(direct, tok.encode("Once upon a time"), 10), skip_special_tokens=True)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 10
    stop = expected.split()[1]       # a word the reply is known to contain
    cut = front.client.completions.create(model="djinn", prompt="Once upon a time", max_tokens=10, temperature=0,
                                          stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_turn_cut_at_a_stop_string_can_be_continued(front, direct):
    """Regression: a cancelled (stop-string) turn rolls the daemon session back, and the front
    recorded it as still holding the turn, so the next turn asked to keep tokens it no longer had."""
    tok = tokenizer(direct)
    messages = [{"role": "user", "content": "Name three colors."}]
    full = tok.decode(direct_reply(direct, chat_ids(tok, messages), 16), skip_special_tokens=True)
    stop = full.split()[2]
    cut = front.client.chat.completions.create(model="djinn", messages=messages, max_tokens=16, temperature=0,
                                               stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    messages += [{"role": "assistant", "content": cut.choices[0].message.content},
                 {"role": "user", "content": "And two more?"}]
    turn2 = front.client.chat.completions.create(model="djinn", messages=messages, max_tokens=8, temperature=0)
    expected = direct_reply(direct, chat_ids(tok, messages), 8)
    assert turn2.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)


def test_tool_conversation_reuses_history_and_pages_by_phase(front, direct):
    tok = tokenizer(direct)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    turn1 = front.client.chat.completions.create(model="djinn", messages=messages, tools=TOOLS, tool_choice=WEATHER,
                                                 max_tokens=24, temperature=0)
    assert turn1.choices[0].finish_reason == "tool_calls"
    call = turn1.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    phases = lambda: [s["phase"] for s in direct.status()["sessions"]]  # noqa: E731
    deadline = time.time() + 30
    while "IO_WAIT" not in phases():      # set once the daemon has finished the turn
        assert time.time() < deadline, direct.status()["sessions"]
        time.sleep(0.1)
    # turn 2, as agent frameworks send it: the assistant's tool call and the tool's result in the history
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    turn2 = front.client.chat.completions.create(model="djinn", messages=messages, tools=TOOLS, max_tokens=10,
                                                 temperature=0)
    history = chat_ids(tok, messages[:1], TOOLS)
    assert turn2.usage.prompt_tokens_details.cached_tokens >= len(history)
    expected = direct_reply(direct, chat_ids(tok, messages, TOOLS), 10)
    assert turn2.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert "IO_WAIT" not in phases()       # the request bringing the tool result set it ACTIVE


def test_twenty_concurrent_client_processes(front):
    prompts = [f"Say the number {i % 5}." for i in range(20)]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "openai_client_proc.py"),
                               front.url + "/v1", p], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in prompts]
    replies = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        replies.append(json.loads(out))
    for i, r in enumerate(replies):
        assert r["completion_tokens"] >= 1
        assert r["content"] == replies[i % 5]["content"]     # same prompt, same greedy reply


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(front):
    def post(body, **kw):
        return httpx.post(front.url + "/v1/chat/completions", timeout=30, **kw, **(
            {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else
            {"json": body}))
    ok = {"model": "djinn", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [("{not json", 400, None), ({**ok, "model": "gpt-9"}, 404, "model_not_found"),
             ({"model": "djinn"}, 400, None), ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
             ({**ok, "temperature": "hot"}, 400, None), ({**ok, "max_tokens": 10 ** 6}, 400, "context_length_exceeded"),
             ({**ok, "messages": [{"role": "user", "content": "x " * 9000}]}, 400, "context_length_exceeded")]
    for body, status, code in cases:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error" and err["code"] == code
    assert post(ok).status_code == 200
    with pytest.raises(openai.NotFoundError):
        front.client.chat.completions.create(model="gpt-9", messages=ok["messages"])


def test_daemon_down_is_503_and_metrics_health(front, tmp_path):
    dead = Front(str(tmp_path / "nobody.sock"))
    try:
        r = httpx.post(dead.url + "/v1/chat/completions", json={"model": "djinn", "messages": [
            {"role": "user", "content": "Hi"}]}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "daemon_unavailable"
        assert httpx.get(dead.url + "/health").status_code == 503
        assert httpx.get(dead.url + "/v1/models").status_code == 200     # still serving
    finally:
        dead.stop()
    assert httpx.get(front.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(front.url + "/metrics").text
    assert "djinn_daemon_up 1.0" in metrics and 'djinn_daemon_counter{name="tokens_generated"}' in metrics
    assert 'djinn_openai_tokens_total{kind="cached"}' in metrics


FAMILY_TEMPLATES = {"qwen": "<tool_response>\n18 C and sunny\n</tool_response>",
                    "llama31": "ipython<|end_header_id|>\n\n18 C and sunny"}


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_tool_calls_in_the_model_family_format(daemon, direct, tmp_path, family):
    """The model's own template renders the tools and feeds the tool result back in its own way; the
    forced call is written in the family's format and parsed into tool_calls."""
    import chat_templates
    tok = tokenizer(direct)
    tok.chat_template = getattr(chat_templates, family.upper())
    tok.save_pretrained(tmp_path)
    assert tool_calls.call_style(tok) == ("hermes" if family == "qwen" else "json")
    front = Front(daemon.socket, "--tokenizer-dir", str(tmp_path))
    try:
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        turn1 = front.client.chat.completions.create(model="djinn", messages=messages, tools=TOOLS,
                                                     tool_choice=WEATHER, max_tokens=24, temperature=0)
        assert turn1.choices[0].finish_reason == "tool_calls"
        call = turn1.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
        rendered = tool_calls.render(tok, messages, TOOLS)
        assert FAMILY_TEMPLATES[family] in rendered and '"name": "get_weather"' in rendered
        turn2 = front.client.chat.completions.create(model="djinn", messages=messages, tools=TOOLS, max_tokens=10,
                                                     temperature=0)
        expected = direct_reply(direct, tok.encode(rendered, add_special_tokens=False), 10)
        assert turn2.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    finally:
        front.stop()


def test_replies_in_each_family_format_parse_into_tool_calls():
    qwen = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    llama = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    for text in (qwen, llama, "Sure. " + qwen):
        content, calls = tool_calls.parse(text)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [("get_weather", {"city": "Paris"})], text
        assert content == ("Sure." if text.startswith("Sure") else None)
    forced = '{"name": "get_weather", "parameters": '
    assert tool_calls.call_end(forced, '{"city": "Paris"}} and more') == len('{"city": "Paris"}}')
    assert tool_calls.call_end(forced, '{"city": "Par') is None


# ---- issue 22 (reliability, round 3), finding 6: the front against bad input and overload ---------
CHAT = {"model": "djinn", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def test_bad_fields_get_json_errors_that_name_them(front):
    """Round 3, finding 6: an integer out of range, a malformed tool_choice and too many or too long
    stop strings get OpenAI's JSON 400 naming the field (seed and tool_choice were 500, plain text)."""
    cases = [({"seed": 2**80}, "seed"), ({"tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
             ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
             ({"stop": ["x"] * 3000}, "stop"), ({"stop": ["x" * 3000]}, "stop")]
    for extra, field in cases:
        r = httpx.post(front.url + "/v1/chat/completions", json=CHAT | extra, timeout=60)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (extra, r.status_code, r.text[:200])
    assert front.client.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")


def test_a_huge_body_is_refused_before_it_is_parsed_or_tokenized(front):
    """Round 3, finding 6: past --max-body-bytes the answer is 413 at once; text that cannot fit the
    context is refused before tokenizing (28.6 MB was tokenized for 32 s before its 400)."""
    started = time.monotonic()
    r = httpx.post(front.url + "/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                   content=json.dumps(CHAT | {"messages": [{"role": "user", "content": "a " * (15 << 20)}]}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    big = CHAT | {"messages": [{"role": "user", "content": "hello " * (1 << 20)}]}    # 6 MiB, under the limit
    r = httpx.post(front.url + "/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 4


def test_health_and_metrics_answer_while_every_request_thread_is_busy(front):
    """Round 3, finding 6: 42 long requests hold all of the front's request threads; /health and
    /metrics still answer at once (they waited for a free thread: 3.1 s)."""
    slow = CHAT | {"max_tokens": 16, "ignore_eos": True}
    busy = [threading.Thread(target=httpx.post, args=(front.url + "/v1/chat/completions",),
                             kwargs={"json": slow, "timeout": 300}) for _ in range(42)]
    for t in busy:
        t.start()
    time.sleep(3)                      # the front has taken them all in
    started = time.monotonic()
    health = httpx.get(front.url + "/health", timeout=60)
    metrics = httpx.get(front.url + "/metrics", timeout=60)
    answered_s = time.monotonic() - started
    still_busy = sum(t.is_alive() for t in busy)
    for t in busy:
        t.join(300)
    assert health.status_code == 200 and metrics.status_code == 200 and "djinn_daemon_up 1.0" in metrics.text
    assert still_busy > 40 and answered_s < 1.5, (still_busy, answered_s)


def test_a_new_conversation_reports_the_shared_system_prompt_as_cached(front, direct):
    """Prefix sharing: a second conversation starting with the same system prompt (another session)
    reports the prompt's full KV blocks it reused as cached_tokens; the client changes nothing."""
    system = {"role": "system", "content": "You answer in one word, carefully and politely. " * 10}
    replies = [front.client.chat.completions.create(model="djinn", messages=[system, {"role": "user", "content": q}],
                                                    max_tokens=4, temperature=0)
               for q in ("Name a colour.", "Name a fruit.")]
    tok = tokenizer(direct)
    assert replies[1].usage.prompt_tokens_details.cached_tokens >= len(chat_ids(tok, [system], None)) - 32
    assert replies[1].usage.prompt_tokens_details.cached_tokens > replies[0].usage.prompt_tokens_details.cached_tokens
