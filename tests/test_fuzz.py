"""Seeded protocol fuzz: >= 10,000 malformed frames across every request type against a real daemon.
Afterwards the daemon is alive, no reply was INTERNAL, a correct request returns the tokens it
returned before, and the daemon's RSS is within 50 MB of what it was."""
import math
import os
import random
import socket
import threading
import time

import msgpack
import psutil
import pytest

import libdjinn
from conftest import start_daemon, stop_daemon
from libdjinn.protocol import HEADER, PROTOCOL_VERSION, REQUESTS, ErrorCode, encode_frame

NUM_FRAMES = int(os.environ.get("DJINN_FUZZ_FRAMES", "10000"))
SEED = int(os.environ.get("DJINN_FUZZ_SEED", "11"))
JUNK = [None, True, False, 0, -1, 1, 7, 2**31, 2**63 - 1, -2**63, 2**64 - 1, 0.5, -0.0, 1e-38, 1e308,
        math.nan, math.inf, -math.inf, "", "x", "IO_WAIT", "ACTIVE", "all", "float32", "é" * 300, b"\x00\xff",
        [], [1, 2], [[1]], ["a"], [None], [math.nan], [2**63 - 1], [-5], {}, {"layer": 1},
        {"layer": 1, "steps": "all"}, {"layer": -1}, {"layer": 2, "steps": [0, 1]}, [{"layer": 3}],
        [{"layer": 1, "steps": "all"}], [{"layer": 0, "steps": [-1]}], [{"role": "user", "content": "hi"}],
        [{"role": 1}], [3, 5, 7, 11], [13] * 2000]


def base_request(kind: str, rng: random.Random, sessions: list[int]) -> dict:
    session = rng.choice(sessions + [0, -1, 10**9]) if sessions else 1
    fields = {"session": session, "version": PROTOCOL_VERSION, "phase": rng.choice(["IO_WAIT", "ACTIVE"]),
              "expected_s": rng.random(), "prompt_ids": [rng.randrange(512) for _ in range(rng.randrange(1, 12))],
              "max_new_tokens": rng.randrange(1, 4), "temperature": rng.choice([0, 0.7]), "top_p": 0.9,
              "seed": rng.randrange(100), "stream": rng.random() < 0.3, "ignore_eos": True,
              "breakpoints": [{"layer": rng.randrange(4)}] if rng.random() < 0.1 else None,
              "shape": [rng.randrange(20), 64], "dtype": "float32"}
    schema = REQUESTS.get(kind, {})
    return {"type": kind, "id": rng.randrange(1 << 20), **{k: fields[k] for k in schema if k in fields
                                                          and fields[k] is not None}}


def mutate(msg: dict, rng: random.Random) -> dict:
    keys = list(REQUESTS.get(msg["type"], {})) + ["type", "id", "bogus"]
    for _ in range(rng.randrange(1, 4)):
        key, roll = rng.choice(keys), rng.random()
        if roll < 0.2:
            msg.pop(key, None)
        else:
            msg[key] = rng.choice(JUNK)
    return msg


def fuzz_body(rng: random.Random, sessions: list[int]) -> bytes:
    roll = rng.random()
    if roll < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))       # not msgpack
    if roll < 0.14:
        return msgpack.packb(rng.choice([[1, 2], 3, "status", None, 1.5, {1: 2}]))  # not a map
    if roll < 0.18:
        return msgpack.packb({"type": rng.choice(["launch", "", "__init__", "_frames"]), "id": 1})
    kind = rng.choice(list(REQUESTS))
    msg = base_request(kind, rng, sessions)
    body = msgpack.packb(mutate(msg, rng) if rng.random() < 0.85 else msg, use_bin_type=True)
    if rng.random() < 0.03:
        body = body[:rng.randrange(len(body) + 1)]                                 # truncated
    return body


class FuzzClient:
    """One connection: a reader thread that counts replies and remembers opened sessions."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.codes, self.sessions, self.closed = [], [], threading.Event()
        self.marks = set()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(encode_frame({"type": "hello", "id": 0, "version": PROTOCOL_VERSION}))

    def send(self, frame: bytes):
        self.sock.sendall(frame)

    def _read(self):
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= HEADER.size and len(buf) >= HEADER.size + HEADER.unpack(buf[:4])[0]:
                    size = HEADER.unpack(buf[:4])[0]
                    reply, buf = msgpack.unpackb(buf[4:4 + size], strict_map_key=False), buf[4 + size:]
                    self._note(reply)
        except OSError:
            pass
        self.closed.set()

    def _note(self, reply: dict):
        if reply.get("type") == "error":
            self.codes.append(reply["code"])
        if reply.get("type") == "result" and isinstance(reply.get("session"), int) and "closed" not in reply:
            self.sessions.append(reply["session"])
        if reply.get("id") in (-1, -2) and reply.get("type") in ("result", "error"):
            self.marks.add((reply["id"], reply.get("code")))

    def sync(self, mark: int, timeout=60):
        """Wait until the daemon answered everything sent before this status request (a LIMIT
        answer means reports of the fuzz are still in flight: ask again)."""
        deadline = time.time() + timeout
        while not self.closed.is_set():
            self.marks.clear()
            self.send(encode_frame({"type": "status", "id": mark}))
            while not self.marks and not self.closed.is_set():
                assert time.time() < deadline, "the daemon stopped answering"
                time.sleep(0.01)
            if (mark, None) in self.marks:
                return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("fuzz"), "--model", "random:tiny", "--kv-cache-mb", "4",
                     "--host-arena-mb", "16", "--pause-timeout-s", "1", "--max-frame-bytes", "65536")
    yield d
    stop_daemon(d)


def reference_tokens(path: str) -> list[int]:
    with libdjinn.connect(path, timeout=60) as djinn:
        return djinn.session().generate(prompt_ids=[1, 5, 9, 200, 17], max_new_tokens=8, ignore_eos=True).tokens


def test_protocol_fuzz_leaves_the_daemon_correct(fuzz_daemon):
    """Malformed frames of every kind get error replies (never INTERNAL), and change nothing else."""
    before_tokens = reference_tokens(fuzz_daemon.socket)
    daemon = psutil.Process(fuzz_daemon.proc.pid)
    rng = random.Random(SEED)
    clients = [FuzzClient(fuzz_daemon.socket) for _ in range(3)]
    rss_before, started, codes = daemon.memory_info().rss, time.time(), []
    for i in range(NUM_FRAMES):
        c = clients[i % len(clients)]
        if c.closed.is_set():            # a bad header ends a connection by design: open another
            codes += c.codes
            c = clients[i % len(clients)] = FuzzClient(fuzz_daemon.socket)
        if rng.random() < 0.002:
            c.send(HEADER.pack(1 << 30))                                  # oversized: the daemon hangs up
            assert c.closed.wait(30)
            continue
        body = fuzz_body(rng, c.sessions)
        c.send(HEADER.pack(len(body)) + body)
        if i % 500 == 499:
            c.sync(-1 if i % 1000 == 499 else -2)
    for c in clients:
        if not c.closed.is_set():
            c.sync(-1)
        codes += c.codes
        c.sock.close()
    assert fuzz_daemon.alive()
    assert time.time() - started < 60
    assert len(codes) > NUM_FRAMES // 2
    assert ErrorCode.INTERNAL not in codes, [c for c in codes if c == ErrorCode.INTERNAL]
    assert {ErrorCode.BAD_FRAME, ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE} <= set(codes)
    time.sleep(1.5)                     # fuzzed pauses time out (pause_timeout_s 1)
    assert reference_tokens(fuzz_daemon.socket) == before_tokens
    assert daemon.memory_info().rss - rss_before < 50 * 2**20
    assert "Traceback" not in fuzz_daemon.log()
