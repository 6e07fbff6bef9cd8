"""A real djinnd process with real agent processes: correct separate results, and bad input that
gets a clear error while the daemon keeps serving everyone else."""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest
import torch

import libdjinn
from conftest import ROOT, hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd.model.presets import build_random
from libdjinn.protocol import HEADER, PROTOCOL_VERSION, ErrorCode, encode_frame

TINY_VOCAB = 512


@pytest.fixture(scope="module")
def hf_tiny():
    return hf_reference(build_random("tiny", 0, torch.float32, "cpu"))


def spawn_agent(socket_path: str, jobs: list[dict]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "agent_proc.py"), socket_path,
                             json.dumps(jobs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(30)
    return s


def read_frame(s: socket.socket) -> dict:
    def recv(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf
    (size,) = HEADER.unpack(recv(HEADER.size))
    return msgpack.unpackb(recv(size))


def greeted(path: str) -> socket.socket:
    s = raw_connect(path)
    s.sendall(encode_frame({"type": "hello", "id": 0, "version": PROTOCOL_VERSION}))
    assert read_frame(s)["type"] == "result"
    return s


def test_concurrent_agent_processes_get_their_own_correct_tokens(tiny_daemon, hf_tiny):
    prompts = random_prompts(TINY_VOCAB, [4, 9, 15, 22, 30, 7], seed=5)
    agents = [spawn_agent(tiny_daemon.socket, [{"prompt_ids": p, "max_new_tokens": 10, "ignore_eos": True}])
              for p in prompts]
    for prompt, agent in zip(prompts, agents):
        out, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, err
        assert json.loads(out)[0]["tokens"] == hf_greedy(hf_tiny, prompt, 10)


def test_multi_turn_session_reuses_resident_kv(tiny_daemon, hf_tiny):
    first, second = random_prompts(TINY_VOCAB, [12, 5], seed=6)
    agent = spawn_agent(tiny_daemon.socket, [{"prompt_ids": first, "max_new_tokens": 6, "ignore_eos": True},
                                             {"prompt_ids": second, "max_new_tokens": 6, "ignore_eos": True}])
    out, err = agent.communicate(timeout=120)
    turn1, turn2 = json.loads(out)
    assert turn2["cached_tokens"] == len(first) + 6 - 1
    assert turn2["tokens"] == hf_greedy(hf_tiny, first + turn1["tokens"] + second, 6)


def test_seeded_sampling_repeats_and_streaming_matches_final(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        a, b = djinn.session(), djinn.session()
        kw = dict(prompt_ids=[5, 6, 7], max_new_tokens=12, temperature=0.8, seed=42, ignore_eos=True)
        first, second = a.generate(**kw).tokens, b.generate(**kw).tokens
        streamed = [e.token for e in djinn.session().stream(**kw)]
    assert first == second == streamed


def test_garbage_bytes_get_an_error_and_the_daemon_keeps_serving(tiny_daemon):
    s = greeted(tiny_daemon.socket)
    junk = b"\xc1\xff garbage"
    s.sendall(HEADER.pack(len(junk)) + junk)
    assert read_frame(s)["code"] == ErrorCode.BAD_FRAME
    s.sendall(encode_frame({"type": "status", "id": 7}))     # the same connection still works
    assert read_frame(s)["id"] == 7
    s.close()
    assert tiny_daemon.alive()


def test_oversized_frame_is_refused_and_connection_closed(tiny_daemon):
    s = greeted(tiny_daemon.socket)
    s.sendall(HEADER.pack(1 << 30))
    reply = read_frame(s)
    assert reply["code"] == ErrorCode.FRAME_TOO_LARGE and "limit" in reply["message"]
    with pytest.raises(ConnectionError):
        read_frame(s)
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        assert djinn.status()["device"] == "cpu"


def test_unknown_type_bad_fields_and_missing_hello(tiny_daemon):
    s = raw_connect(tiny_daemon.socket)
    s.sendall(encode_frame({"type": "status", "id": 1}))
    assert read_frame(s)["code"] == ErrorCode.BAD_VERSION
    s.sendall(encode_frame({"type": "hello", "id": 2, "version": 999}))
    assert read_frame(s)["code"] == ErrorCode.BAD_VERSION
    s.sendall(encode_frame({"type": "hello", "id": 3, "version": PROTOCOL_VERSION}))
    read_frame(s)
    s.sendall(encode_frame({"type": "launch_missiles", "id": 4}))
    assert read_frame(s)["code"] == ErrorCode.UNKNOWN_TYPE
    s.sendall(encode_frame({"type": "generate", "id": 5, "session": "one", "prompt_ids": [1]}))
    reply = read_frame(s)
    assert reply["code"] == ErrorCode.BAD_REQUEST and "'session'" in reply["message"]
    s.close()


def test_unknown_and_foreign_sessions_are_refused(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as alice, libdjinn.connect(tiny_daemon.socket) as mallory:
        mine = alice.session()
        with pytest.raises(libdjinn.UnknownSession):
            mallory.request("generate", session=10**6, prompt_ids=[1])
        with pytest.raises(libdjinn.NotOwner):
            mallory.request("generate", session=mine.id, prompt_ids=[1])
        with pytest.raises(libdjinn.NotOwner):
            mallory.request("close_session", session=mine.id)
        assert mine.generate(prompt_ids=[1, 2], max_new_tokens=2).tokens   # untouched


def test_prompt_longer_than_context_is_refused(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        with pytest.raises(libdjinn.ContextOverflow, match="context of 1024"):
            djinn.session().generate(prompt_ids=[3] * 1100, max_new_tokens=4)


def test_text_prompt_on_a_model_without_tokenizer_names_the_problem(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        with pytest.raises(libdjinn.DjinnError, match="no tokenizer"):
            djinn.session().generate("hello")


def test_killed_client_frees_its_sessions_and_blocks(tiny_daemon):
    agent = spawn_agent(tiny_daemon.socket, [{"prompt_ids": [4] * 50, "max_new_tokens": 900, "ignore_eos": True}])
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        deadline = time.time() + 60
        while not any(s["owner_pid"] == agent.pid and s["state"] == "running" for s in djinn.status()["sessions"]):
            assert time.time() < deadline, "the agent's session never started running"
            time.sleep(0.05)
        agent.kill()
        agent.wait()
        while any(s["owner_pid"] == agent.pid for s in djinn.status()["sessions"]):
            assert time.time() < deadline + 30, "the dead agent's session was not released"
            time.sleep(0.05)
        status = djinn.status()
    assert status["memory"]["kv_blocks_used"] == sum(s["kv_blocks"] for s in status["sessions"])
    assert status["counters"]["sessions_released_on_disconnect"] >= 1
    assert tiny_daemon.alive()


def test_full_pool_queues_instead_of_crashing(tmp_path, hf_tiny):
    """A pool that holds one request at a time: the rest wait their turn and all complete."""
    daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.25")
    try:
        prompts = random_prompts(TINY_VOCAB, [40, 41, 42], seed=8)
        jobs = [[{"prompt_ids": p, "max_new_tokens": 60, "ignore_eos": True}] for p in prompts]
        agents = [spawn_agent(daemon.socket, j) for j in jobs]
        outs = [a.communicate(timeout=120) for a in agents]
        # agents close their sessions on exit, which frees blocks for the next in the queue
        for prompt, (out, err) in zip(prompts, outs):
            assert json.loads(out)[0]["tokens"] == hf_greedy(hf_tiny, prompt, 60), err
        with libdjinn.connect(daemon.socket) as djinn, pytest.raises(libdjinn.NoCapacity, match="blocks"):
            djinn.session().generate(prompt_ids=[3] * 500, max_new_tokens=10)
    finally:
        stop_daemon(daemon)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_other_uid_is_refused_by_peer_credentials():
    where = pathlib.Path(tempfile.mkdtemp(prefix="djinn-uid-"))   # traversable by uid nobody
    os.chmod(where, 0o755)
    daemon = start_daemon(where, "--model", "random:tiny", "--kv-cache-mb", "1", "--socket-mode", "0666")
    try:
        os.chmod(os.path.dirname(daemon.socket), 0o755)
        read_end, write_end = os.pipe()
        if os.fork() == 0:   # the child drops to uid nobody, then connects as that user
            try:
                os.setuid(65534)
                s = raw_connect(daemon.socket)
                os.write(write_end, str(read_frame(s)["code"]).encode())
            except Exception as e:
                os.write(write_end, repr(e).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        assert os.read(read_end, 200).decode() == str(int(ErrorCode.PERMISSION_DENIED))
    finally:
        stop_daemon(daemon)
        shutil.rmtree(where, ignore_errors=True)


def test_readiness_is_sent_to_systemd(tmp_path):
    """Type=notify: the daemon sends READY=1 to $NOTIFY_SOCKET once it serves."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(60)
    os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    try:
        daemon = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.5")
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert listener.recv(64) == b"READY=1"
    finally:
        stop_daemon(daemon)
        listener.close()
