"""Issue 11, one regression test per finding: nothing a client does can hang or crash the daemon,
and after each attack the daemon still serves other clients with correct tokens (HF reference)."""
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import pathlib

import posix_ipc
import psutil
import pytest
import torch

import libdjinn
from conftest import ROOT, hf_greedy, hf_reference, random_prompts, start_daemon, stop_daemon
from djinnd.model.presets import build_random
from libdjinn.protocol import PROTOCOL_VERSION, ErrorCode, encode_frame
from test_daemon import read_frame

FAULTS = ("tests/fault_daemon.py",)
# evict_low_water 1: IO_WAIT sessions leave the device at once (between steps), as these tests expect
TINY = ("--model", "random:tiny", "--kv-cache-mb", "4", "--host-arena-mb", "16", "--evict-low-water", "1")
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def hf_tiny():
    return hf_reference(build_random("tiny", 0, torch.float32, "cpu"))


def prompts(*lengths, seed=0):
    return random_prompts(512, lengths, seed=seed)


# ---- raw frames ---------------------------------------------------------------------------------
def greeted(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(30)
    s.sendall(encode_frame({"type": "hello", "id": 0, "version": PROTOCOL_VERSION}))
    assert read_frame(s)["type"] == "result"
    return s


def ask(s: socket.socket, **frame) -> dict:
    s.sendall(encode_frame(frame))
    return read_frame(s)


def final(s: socket.socket, rid: int) -> dict:
    while True:
        reply = read_frame(s)
        if reply["id"] == rid and reply["type"] in ("done", "error", "result"):
            return reply


def wait_until(condition, timeout=10.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.02)


# ---- finding 1 and 7: injected faults -------------------------------------------------------------
@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("faults"), *TINY, "--capacity-wait-s", "1",
                     entry=FAULTS + ("prefetch,forward,stuck_resume",))
    yield d
    stop_daemon(d)


def test_pager_fault_on_the_prefetch_path_hangs_nobody(faults, hf_tiny):
    """Finding 1: an exception in the pager's tick no longer kills the engine thread."""
    first, second, other = prompts(10, 4, 7, seed=1)
    with libdjinn.connect(faults.socket, timeout=30) as djinn:
        s = djinn.session()
        out = s.generate(prompt_ids=first, max_new_tokens=4, ignore_eos=True).tokens
        s.signal_phase("IO_WAIT", expected_s=0.5)      # evicted; the timed prefetch fails (injected)
        time.sleep(1.0)
        status = djinn.status()                          # was: never answered
        assert status["counters"]["engine_iteration_errors"] >= 1
        assert djinn.session().generate(prompt_ids=other, max_new_tokens=5, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, other, 5)
        s.signal_phase("ACTIVE")
        assert s.generate(prompt_ids=second, max_new_tokens=4, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, first + out + second, 4)
    assert "injected fault: swap_in" in faults.log()


def test_engine_thread_death_exits_nonzero_and_answers_clients(tmp_path):
    """Finding 1: if the engine thread dies, clients get an error (not a hang) and the daemon exits 70."""
    d = start_daemon(tmp_path, *TINY, entry=FAULTS + ("die",))
    errors = []

    def long_generate():
        with libdjinn.connect(d.socket, timeout=30) as djinn:
            try:
                djinn.session().generate(prompt_ids=[5] * 8, max_new_tokens=1000, ignore_eos=True)
            except libdjinn.DjinnError as e:
                errors.append(e)
    t = threading.Thread(target=long_generate)
    t.start()
    time.sleep(0.5)
    with libdjinn.connect(d.socket, timeout=30) as djinn:
        with pytest.raises(libdjinn.DaemonUnavailable):
            djinn.session().signal_phase("IO_WAIT")      # the injected death
    t.join(30)
    assert d.proc.wait(30) == 70
    assert len(errors) == 1 and errors[0].code == ErrorCode.UNAVAILABLE, errors


def test_failed_forward_leaves_no_prompt_in_history(faults, hf_tiny):
    """Finding 7: a request whose forward fails leaves the session as it was before it."""
    history, after = prompts(9, 5, seed=2)
    with libdjinn.connect(faults.socket, timeout=30) as djinn:
        s = djinn.session()
        out = s.generate(prompt_ids=history, max_new_tokens=3, ignore_eos=True).tokens
        with pytest.raises(libdjinn.DjinnError, match="forward failed"):
            s.generate(prompt_ids=[5, 499, 6], max_new_tokens=3)
        assert s.generate(prompt_ids=after, max_new_tokens=4, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, history + out + after, 4)


# ---- a daemon with small limits -----------------------------------------------------------------
LIMITS = ("--max-num-seqs", "4", "--max-paused-per-client", "2", "--max-paused", "4", "--pause-timeout-s", "3",
          "--max-sessions-per-client", "5", "--max-connections", "6")


@pytest.fixture(scope="module")
def limited():
    # A folder other users may traverse, so the group test below can reach the socket.
    folder = pathlib.Path(tempfile.mkdtemp(prefix="djinn-limits-"))
    folder.chmod(0o755)
    group = ("--allowed-group", "nogroup", "--socket-mode", "0660") if IS_ROOT else ()
    d = start_daemon(folder, *TINY, *LIMITS, *group)
    yield d
    stop_daemon(d)
    shutil.rmtree(folder, ignore_errors=True)


BAD_FIELDS = [("temperature", float("nan")), ("temperature", 1e-38), ("temperature", float("inf")),
              ("temperature", -1), ("temperature", 101), ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
              ("max_new_tokens", 0), ("max_new_tokens", 2**40), ("seed", -1), ("seed", 2**64 - 1),
              ("breakpoints", [{"layer": True}]), ("breakpoints", [{"layer": 1, "steps": [-1]}])]


def test_bad_sampling_values_are_refused_at_the_door(limited, hf_tiny):
    """Finding 3: NaN, tiny, huge or null sampling values get BAD_REQUEST and never reach a batch."""
    [p] = prompts(6, seed=3)
    s = greeted(limited.socket)
    sid = ask(s, type="open_session", id=1)["session"]
    honest = greeted(limited.socket)
    honest_sid = ask(honest, type="open_session", id=1)["session"]
    for i, (key, value) in enumerate(BAD_FIELDS):
        honest.sendall(encode_frame({"type": "generate", "id": 100 + i, "session": honest_sid, "prompt_ids": p,
                                     "max_new_tokens": 3, "ignore_eos": True}))
        reply = ask(s, type="generate", id=10 + i, session=sid, prompt_ids=p, **{key: value})
        assert reply["code"] == ErrorCode.BAD_REQUEST and (key in reply["message"] or "breakpoint" in
                                                           reply["message"]), (key, value, reply)
        assert final(honest, 100 + i)["tokens"] == hf_greedy(hf_tiny, p, 3)
        ask(honest, type="close_session", id=1, session=honest_sid)
        honest_sid = ask(honest, type="open_session", id=1)["session"]
    nulls = ask(s, type="generate", id=99, session=sid, prompt_ids=p, temperature=None, top_p=None,
                max_new_tokens=None, seed=None)       # null is absent: the defaults
    assert nulls["type"] == "done" and len(nulls["tokens"]) >= 1
    reply = ask(s, type="set_phase", id=98, session=sid, phase="IO_WAIT", expected_s=float("nan"))
    assert reply["code"] == ErrorCode.BAD_REQUEST and "expected_s" in reply["message"]
    s.close()
    honest.close()


def test_shrunk_activation_segment_cannot_crash_the_daemon(limited, hf_tiny):
    """Finding 2 (and round 3, finding 4): a client cannot ftruncate its paused activations at all
    (a sealed memfd, it got BAD_REQUEST before); an abandoned trace is cancelled in the daemon."""
    [p] = prompts(11, seed=4)
    with libdjinn.connect(limited.socket, timeout=30) as djinn:
        s = djinn.session()
        trace = iter(s.trace(prompt_ids=p, breakpoints=[1], max_new_tokens=4, ignore_eos=True))
        bp = next(trace)
        with pytest.raises(PermissionError):
            os.ftruncate(bp._mapped.fd, 0)
        trace.close()                                 # abandoned: cancelled in the daemon
        assert limited.alive()
        assert s.generate(prompt_ids=p, max_new_tokens=4, ignore_eos=True).tokens == hf_greedy(hf_tiny, p, 4)


def test_leaving_a_trace_early_frees_the_session(limited, hf_tiny):
    """Finding 7: break or an exception in a trace loop cancels the request; the session is usable at once."""
    p, q = prompts(8, 6, seed=5)
    with libdjinn.connect(limited.socket, timeout=30) as djinn:
        s = djinn.session()
        for bp in s.trace(prompt_ids=p, breakpoints=[0, 2], steps="all", max_new_tokens=6):
            break
        with pytest.raises(KeyError):
            for bp in s.trace(prompt_ids=p, breakpoints=[1], max_new_tokens=6):
                raise KeyError("the agent's own bug")
        assert s.generate(prompt_ids=q, max_new_tokens=4, ignore_eos=True).tokens == hf_greedy(hf_tiny, q, 4)
        assert djinn.status()["counters"]["requests_cancelled"] >= 2
        out = s.generate(prompt_ids=p, max_new_tokens=3, ignore_eos=True).tokens
        for bp in s.trace(prompt_ids=q, breakpoints=[1], max_new_tokens=6):
            s.signal_phase("IO_WAIT")             # the paused session's KV goes to the host arena
            wait_until(lambda: next(r for r in djinn.status()["sessions"] if r["id"] == s.id)["kv_where"]
                       in ("host", "->host"))
            break                                 # cancelled while swapped out (the soak found this)
        assert s.generate(prompt_ids=q, max_new_tokens=4, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, q + hf_greedy(hf_tiny, q, 4) + p + out + q, 4)


def test_abandoned_stream_stops_generating(limited):
    """Finding 7: an abandoned stream() is cancelled: the daemon stops producing its tokens."""
    with libdjinn.connect(limited.socket, timeout=30) as djinn:
        s = djinn.session()
        for i, _ in enumerate(s.stream(prompt_ids=[7, 8, 9], max_new_tokens=900, ignore_eos=True)):
            if i == 3:
                break
        time.sleep(0.3)
        produced = djinn.status()["counters"]["tokens_generated"]
        time.sleep(0.5)
        assert djinn.status()["counters"]["tokens_generated"] == produced
        assert s.generate(prompt_ids=[3], max_new_tokens=2).finish_reason in ("length", "stop")


def test_paused_sessions_cannot_stall_other_clients(limited, hf_tiny):
    """Finding 4: pauses per client are capped and time out; other clients keep getting correct tokens."""
    [p] = prompts(9, seed=6)
    hoarder = greeted(limited.socket)
    sids = [ask(hoarder, type="open_session", id=i)["session"] for i in range(3)]
    for i, sid in enumerate(sids):
        hoarder.sendall(encode_frame({"type": "generate", "id": 10 + i, "session": sid, "prompt_ids": p,
                                      "breakpoints": [{"layer": 1}], "max_new_tokens": 4}))
    replies = {r["id"]: r for r in (read_frame(hoarder) for _ in range(3))}
    assert [replies[10]["type"], replies[11]["type"]] == ["paused", "paused"]
    assert replies[12]["code"] == ErrorCode.LIMIT and "max_paused_per_client" in replies[12]["message"]
    expected = hf_greedy(hf_tiny, p, 4)
    started = time.monotonic()
    try:
        with libdjinn.connect(limited.socket, timeout=30) as other:
            for _ in range(3):
                assert other.session().generate(prompt_ids=p, max_new_tokens=4, ignore_eos=True).tokens == expected
        assert time.monotonic() - started < 3      # served while both pauses are held
    except BaseException:
        hoarder.close()                            # later tests count the connections
        raise
    timed_out = [read_frame(hoarder) for _ in range(2)]     # pause_timeout_s = 3
    assert {r["code"] for r in timed_out} == {ErrorCode.TIMEOUT}
    assert ask(hoarder, type="generate", id=20, session=sids[0], prompt_ids=p, max_new_tokens=4,
               ignore_eos=True)["tokens"] == hf_greedy(hf_tiny, p, 4)
    hoarder.close()


def test_per_client_caps_and_back_pressure(limited, hf_tiny):
    """Finding 5: sessions per connection are capped; a client that pipelines without reading
    stalls only itself and the daemon's memory stays flat."""
    with libdjinn.connect(limited.socket, timeout=30) as djinn:
        sessions = [djinn.session() for _ in range(5)]
        with pytest.raises(libdjinn.LimitReached, match="max_sessions_per_client"):
            djinn.session()
        sessions[0].close()
        djinn.session()
    daemon = psutil.Process(limited.proc.pid)
    before = daemon.memory_info().rss
    flood = greeted(limited.socket)
    flood.settimeout(0.5)
    frame = encode_frame({"type": "timeline", "id": 1})
    sent = 0
    try:
        while sent < 50000:
            flood.sendall(frame)
            sent += 1
    except socket.timeout:
        pass                                       # the daemon stopped reading: back-pressure
    [p] = prompts(5, seed=7)
    with libdjinn.connect(limited.socket, timeout=30) as other:
        assert other.session().generate(prompt_ids=p, max_new_tokens=3, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, p, 3)
    assert daemon.memory_info().rss - before < 50 * 2**20
    flood.close()


def test_connection_cap_answers_and_does_not_flood_the_log(limited):
    """Finding 10: past max_connections a client gets a LIMIT error at once, and the log stays quiet."""
    time.sleep(0.3)                               # earlier tests' connections are gone
    held = [greeted(limited.socket) for _ in range(6)]
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX)
        s.connect(limited.socket)
        s.settimeout(10)
        reply = read_frame(s)
        assert reply["code"] == ErrorCode.LIMIT and "max_connections" in reply["message"]
        s.close()
    held.pop().close()
    time.sleep(0.2)
    with libdjinn.connect(limited.socket, timeout=30) as djinn:
        assert djinn.status()["device"] == "cpu"
    for s in held:
        s.close()
    assert limited.log().count("max_connections") <= 2


def others_can_reach(path: str) -> bool:
    """Every folder above the file a link resolves to is searchable by others (a venv's python may
    be a link into /root, and its standard library too)."""
    real = pathlib.Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in real.parents if str(p) != "/")


def other_user_python(executable: str):
    """Yields (python, PYTHONPATH) another uid can run libdjinn with: `executable` if others can reach
    it, else the system python of the same version with copies of libdjinn's three dependencies."""
    base = subprocess.run([executable, "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                          text=True).stdout.strip()
    if others_can_reach(executable) and others_can_reach(os.path.join(base, "lib")):
        yield executable, ROOT
        return
    system = shutil.which("python3", path="/usr/bin:/bin")
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True).stdout.strip() if system else ""
    if version != str(sys.version_info[:2]):
        pytest.skip("no python that other users can run")
    import msgpack
    import numpy
    deps = tempfile.mkdtemp(prefix="djinn-deps-")
    for module in (msgpack, numpy):
        shutil.copytree(module.__path__[0], os.path.join(deps, os.path.basename(module.__path__[0])))
    libs = numpy.__path__[0] + ".libs"
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(deps, "numpy.libs"))
    shutil.copy(posix_ipc.__file__, deps)
    subprocess.run(["chmod", "-R", "a+rX", deps], check=True)
    yield system, f"{deps}:{ROOT}"
    shutil.rmtree(deps, ignore_errors=True)


@pytest.fixture(scope="module")
def user_python():
    yield from other_user_python(sys.executable)


def test_user_python_yields_for_an_interpreter_others_can_reach():
    """Round 3, finding 8: the fixture yielded nothing when the interpreter was reachable (fresh venv)."""
    reachable = shutil.which("python3", path="/usr/bin:/bin")
    if not reachable or not all(os.stat(p).st_mode & 0o001 for p in pathlib.Path(reachable).parents
                                if str(p) != "/"):
        pytest.skip("no interpreter other users can reach")
    assert next(other_user_python(reachable)) == (reachable, ROOT)


def as_user(python, uid: int, gid: int, code: str) -> subprocess.CompletedProcess:
    def drop():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return subprocess.run([python[0], "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=drop, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": python[1]}, cwd="/")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as other users")
def test_other_users_group_access_status_and_fake_socket_folder(limited, user_python):
    """Finding 8/9: group members may connect and see only their own sessions; other uids are refused;
    a client refuses a /tmp socket folder another user created."""
    code = ("import libdjinn, json; d = libdjinn.connect(%r); s = d.session();"
            "print(json.dumps([r['id'] for r in d.status()['sessions']] + [s.id]))" % limited.socket)
    with libdjinn.connect(limited.socket) as root:
        mine = root.session()
        member = as_user(user_python, 65534, 65534, code)     # nobody, in group nogroup
        assert member.returncode == 0, member.stderr
        seen = eval(member.stdout)
        assert seen[:-1] == [seen[-1]] and mine.id not in seen     # nobody sees its own session only
        assert {r["id"] for r in root.status()["sessions"]} >= {mine.id}
    stranger = as_user(user_python, 65533, 65533, code)
    assert "DaemonUnavailable" in stranger.stderr and "not allowed" in stranger.stderr   # socket 0660
    fake = "/tmp/djinn-65534"
    if os.path.exists(fake):
        pytest.skip(f"{fake} exists")
    os.mkdir(fake)
    try:
        os.chown(fake, 65533, 65533)
        os.chmod(fake, 0o777)
        victim = as_user(user_python, 65534, 65534, "import libdjinn; libdjinn.connect()")
        assert "owned by uid 65533" in victim.stderr and "DaemonUnavailable" in victim.stderr
    finally:
        os.rmdir(fake)


def test_client_timeout_and_connect_errors_name_the_path(tmp_path):
    """Finding 1/8: a daemon that never answers times out; a wrong path names itself and the fix."""
    path = str(tmp_path / "silent.sock")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(path)
    silent.listen()
    started = time.monotonic()
    with pytest.raises(libdjinn.Timeout, match="within 1 s"):
        libdjinn.connect(path, timeout=1)
    assert time.monotonic() - started < 5
    silent.close()
    missing = str(tmp_path / "nowhere" / "djinnd.sock")
    with pytest.raises(libdjinn.DaemonUnavailable, match="nowhere") as e:
        libdjinn.connect(missing)
    assert isinstance(e.value, ConnectionError) and "start djinnd" in str(e.value)


# ---- round 3, finding 1: every pause and every request has a bound that fires --------------------
def kv_where(djinn, sid: int) -> str:
    return next(r for r in djinn.status()["sessions"] if r["id"] == sid)["kv_where"]


def test_resumed_pause_that_cannot_get_its_kv_back_ends(faults, hf_tiny):
    """Round 3, finding 1: a resumed pause whose KV never comes back (pool and arena full of sessions
    nobody may evict; injected) ends with NO_CAPACITY within capacity_wait_s (was: paused forever,
    holding its row and every refusal); others are served meanwhile and the session stays usable."""
    p, other = prompts(12, 6, seed=20)
    stuck = p[:5] + [498] + p[5:]
    with libdjinn.connect(faults.socket, timeout=20) as djinn:
        s = djinn.session()
        trace = iter(s.trace(prompt_ids=stuck, breakpoints=[1], max_new_tokens=4, ignore_eos=True))
        next(trace).resume()
        started = time.monotonic()
        assert djinn.session().generate(prompt_ids=other, max_new_tokens=3, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, other, 3)
        with pytest.raises(libdjinn.NoCapacity, match="capacity_wait_s"):
            next(trace)
        assert time.monotonic() - started < 10
        assert s.generate(prompt_ids=p, max_new_tokens=4, ignore_eos=True).tokens == hf_greedy(hf_tiny, p, 4)


def test_paused_sessions_of_many_clients_leave_batch_rows(limited, hf_tiny):
    """Round 3, finding 1: pauses are capped across connections (half the batch rows at most), so
    pauses of several clients never fill max_num_seqs and another client is served at once."""
    p, q = prompts(9, 7, seed=21)
    hoarders = [greeted(limited.socket) for _ in range(2)]
    codes = []
    for h in hoarders:
        for i in range(2):
            sid = ask(h, type="open_session", id=1 + i)["session"]
            codes.append(ask(h, type="generate", id=10 + i, session=sid, prompt_ids=p, max_new_tokens=4,
                             breakpoints=[{"layer": 1}]).get("code", "paused"))
    assert codes.count("paused") == 2 and codes.count(ErrorCode.LIMIT) == 2, codes     # max_num_seqs 4
    started = time.monotonic()
    with libdjinn.connect(limited.socket, timeout=30) as other:
        outs = [other.session() for _ in range(2)]
        pending = [threading.Thread(target=lambda s=s: s.generate(prompt_ids=q, max_new_tokens=4)) for s in outs]
        for t in pending:
            t.start()
        for t in pending:
            t.join(30)
        assert other.session().generate(prompt_ids=q, max_new_tokens=4, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, q, 4)
    assert time.monotonic() - started < 2.5        # was: waited for the pause timeout (3 s)
    for h in hoarders:
        h.close()


# ---- round 3, finding 2: NaN written by one client never reaches another --------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """15 KV blocks, so freed blocks are soon another session's."""
    d = start_daemon(tmp_path_factory.mktemp("small"), "--model", "random:tiny", "--kv-cache-mb", "0.25",
                     "--host-arena-mb", "1", "--max-connections", "8", "--max-connections-per-uid", "6",
                     "--max-connections-per-pid", "3", "--max-segment-mb-per-client", "0.25",
                     "--max-segment-mb-per-uid", "0.5")
    yield d
    stop_daemon(d)


def generate_all(conn, ids: list[list[int]], n: int) -> list[list[int]]:
    """One session per prompt, all in flight at once (one batch)."""
    out, sessions = {}, [conn.session() for _ in ids]
    threads = [threading.Thread(target=lambda i=i, s=s: out.update(
        {i: s.generate(prompt_ids=ids[i], max_new_tokens=n, ignore_eos=True).tokens})) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in sessions:
        s.close()
    return [out.get(i) for i in range(len(ids))]


def test_nan_written_into_a_pause_never_reaches_another_client(small, hf_tiny):
    """Round 3, finding 2: resume refuses NaN/inf hidden states (the session stays paused and resumes
    with finite ones), so freed blocks never carry NaN into other clients' batches (was: 11 of 32
    later generates of another client came back as zeros)."""
    p, *others = prompts(100, 5, 9, 13, 17, 21, 26, seed=22)
    with libdjinn.connect(small.socket, timeout=30) as djinn:
        s = djinn.session()
        trace = iter(s.trace(prompt_ids=p, breakpoints=[1], max_new_tokens=8, ignore_eos=True))
        bp = next(trace)
        for bad in (float("nan"), float("inf"), float("-inf")):
            bp.hidden[3, 5] = bad
            with pytest.raises(libdjinn.BadRequest, match="NaN or inf"):
                bp.resume()
        bp.hidden[3, 5] = 0.5
        bp.resume()
        assert list(trace) == []
        s.close()
        assert generate_all(djinn, others, 6) == [hf_greedy(hf_tiny, q, 6) for q in others]


def test_decode_attention_never_reads_nan_from_blocks_a_session_does_not_own():
    """Round 3, finding 2: the torch decode path gathers whole blocks (padding, a freed block's stale
    slots); NaN there no longer leaks through the mask (0 x NaN was NaN)."""
    from djinnd.model.attention import decode_attention_torch
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(6, 4, 2, 16, generator=g) for _ in range(2))     # blocks, slots, kv heads, dim
    q = torch.randn(2, 4, 16, generator=g)
    tables, ctx = torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([6, 3])   # padded with block 0
    clean = decode_attention_torch(q, k, v, tables, ctx, 3)
    for t in (k, v):
        t[0], t[2, 2:], t[3, 3:], t[4:] = (float("nan"),) * 4      # nobody's slots
    assert torch.equal(decode_attention_torch(q, k, v, tables, ctx, 3), clean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_kernel_never_reads_nan_from_blocks_a_session_does_not_own():
    """Round 3, finding 2: the Triton decode kernel masks its loads; NaN in foreign blocks stays out."""
    from djinnd.model import triton_attention
    from djinnd.model.attention import decode_attention_torch
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(40, 16, 2, 64, generator=g).cuda() for _ in range(2))
    q = torch.randn(3, 8, 64, generator=g).cuda()
    tables = torch.tensor([[1, 2, 5, 6], [3, 0, 0, 0], [7, 8, 9, 0]], dtype=torch.int32).cuda()
    ctx = torch.tensor([50, 3, 33], dtype=torch.int32).cuda()
    clean = decode_attention_torch(q, k, v, tables, ctx, 4)
    for t in (k, v):
        t[0], t[6, 2:], t[3, 3:], t[9, 1:], t[10:] = (float("nan"),) * 5
    for splits in (1, 4):
        out = triton_attention.paged_decode_attention(q, k, v, tables, ctx, splits)
        assert out.isfinite().all() and torch.allclose(out, clean, atol=1e-3, rtol=1e-3), splits


# ---- round 3, finding 3: one process cannot lock everyone out ------------------------------------
HOG = """import sys, libdjinn
held = [libdjinn.connect(sys.argv[1], timeout=30) for _ in range(int(sys.argv[2]))]
try:
    libdjinn.connect(sys.argv[1], timeout=30)
    print("connected", flush=True)
except libdjinn.LimitReached as e:
    print("LimitReached", e, flush=True)
sys.stdin.read()
"""


def test_one_process_cannot_take_every_connection(small, hf_tiny):
    """Round 3, finding 3: connections are capped per process and per uid below the global cap, so
    another process still gets in and is served; refused clients get the LIMIT error (was: a reset)
    and the log says so once, not per refusal."""
    hog = subprocess.Popen([sys.executable, "-c", HOG, small.socket, "3"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = hog.stdout.readline()
        assert line.startswith("LimitReached") and "max_connections_per_pid" in line, line
        [p] = prompts(6, seed=23)
        mine = [libdjinn.connect(small.socket, timeout=30) for _ in range(3)]
        assert mine[0].session().generate(prompt_ids=p, max_new_tokens=3, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, p, 3)
        for _ in range(20):                         # uid 6 of 6 (the global cap is 8)
            with pytest.raises(libdjinn.LimitReached, match="max_connections_per_uid"):
                libdjinn.connect(small.socket, timeout=30)
        mine.pop().close()
        time.sleep(0.2)
        mine.append(libdjinn.connect(small.socket, timeout=30))
        for c in mine:
            c.close()
    finally:
        hog.stdin.close()
        hog.wait(30)
    assert small.log().count("max_connections_per_uid") <= 2


# ---- round 3, finding 5: quotas on what a client makes the daemon allocate ------------------------
def test_segments_have_quotas_per_connection_and_per_uid(small, hf_tiny):
    """Round 3, finding 5: logits and activation segments count against their connection and its uid;
    past either cap the request gets LIMIT (was: 60 connections grew /dev/shm by 240 MiB), and what a
    connection held is given back when it closes."""
    def forward(conn, n):                 # 2 KiB of logits per token (vocab 512, float32), kept until the next
        return conn.request("forward", input_ids=[list(range(3, 3 + n))])
    a, b, c = (libdjinn.connect(small.socket, timeout=30) for _ in range(3))
    with pytest.raises(libdjinn.LimitReached, match="max_segment_mb_per_client"):
        forward(a, 200)                   # 400 KiB > 256 KiB
    forward(a, 120)
    [p] = prompts(80, seed=24)            # 20 KiB of activations at the pause: 260 KiB in all
    with pytest.raises(libdjinn.LimitReached, match="max_segment_mb_per_client"):
        next(iter(a.session().trace(prompt_ids=p, breakpoints=[1], max_new_tokens=2)))
    forward(b, 120)                       # the uid holds 480 KiB of 512
    with pytest.raises(libdjinn.LimitReached, match="max_segment_mb_per_uid"):
        forward(c, 40)
    a.close()
    time.sleep(0.3)
    forward(c, 40)
    assert c.session().generate(prompt_ids=p, max_new_tokens=3, ignore_eos=True).tokens == hf_greedy(hf_tiny, p, 3)
    b.close()
    c.close()


# ---- round 3, finding 4: shared memory no client can shrink or rewrite -----------------------------
def refuses_every_change(fd: int, size: int):
    """Each way a same-user process could shrink, grow or write a segment, on its descriptor and on a
    read-write reopening through /proc (seals hold for every descriptor of the file)."""
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        for target in (fd, reopened):
            for attempt in (lambda f: os.ftruncate(f, 0), lambda f: os.ftruncate(f, size + 4096),
                            lambda f: os.pwrite(f, b"\0" * 64, 0), lambda f: mmap.mmap(f, size),
                            lambda f: os.posix_fallocate(f, 0, size + 4096)):
                with pytest.raises(PermissionError):
                    attempt(target)
    finally:
        os.close(reopened)


def test_no_client_can_shrink_or_rewrite_the_daemons_shared_memory(small, hf_tiny):
    """Round 3, finding 4: the CPU weights export and the logits are sealed memfds (no /dev/shm name;
    their descriptors come over the socket): truncating, growing or writing them fails for the client
    (a truncated weights segment made the next generate die of SIGBUS, and any same-user process could
    rewrite the weights); a pause's activations may be edited but never resized."""
    [p] = prompts(11, seed=25)
    with libdjinn.connect(small.socket, timeout=30) as djinn:
        assert [n for n in os.listdir("/dev/shm") if n.startswith(f"djinn-{small.proc.pid}-")] == []
        weights = djinn.request("attach_weights")
        refuses_every_change(weights["fd"], weights["nbytes"])
        logits = djinn.request("forward", input_ids=[p])["logits"]
        refuses_every_change(logits["fd"], os.fstat(logits["fd"]).st_size)
        s = djinn.session()
        trace = iter(s.trace(prompt_ids=p, breakpoints=[1], max_new_tokens=4, ignore_eos=True))
        bp = next(trace)
        size = os.fstat(bp._mapped.fd).st_size
        for attempt in (lambda: os.ftruncate(bp._mapped.fd, 0), lambda: os.ftruncate(bp._mapped.fd, size * 2)):
            with pytest.raises(PermissionError):
                attempt()
        bp.hidden.mul_(1.0)                   # editing in place is the point of a pause
        held = [f"/proc/{small.proc.pid}/fd/{n}" for n in os.listdir(f"/proc/{small.proc.pid}/fd")
                if os.readlink(f"/proc/{small.proc.pid}/fd/{n}").startswith("/memfd:")]
        assert held                           # the weights, this pause; the host arena keeps no descriptor
        for path in held:                     # what a same-user process could still reach, through /proc
            fd = os.open(path, os.O_RDWR)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            os.close(fd)
        bp.resume()
        assert list(trace) == [] and small.alive()
        assert s.generate(prompt_ids=p, max_new_tokens=4, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, p + hf_greedy(hf_tiny, p, 4) + p, 4)
        for fd in (weights["fd"], logits["fd"]):
            os.close(fd)


# ---- round 3, finding 6: the front's stop matcher ------------------------------------------------
def test_stop_matcher_finds_stops_and_holds_back_their_starts_like_a_plain_search():
    """Round 3, finding 6: the Aho-Corasick stop matcher (one step per character, whatever the stop
    strings) cuts where a plain search of every stop finds the first one, and holds back exactly the
    text's longest end that begins a stop string."""
    import random

    from libdjinn.openai.stops import StopMatcher
    r = random.Random(0)
    for _ in range(2000):
        stops = ["".join(r.choice("ab") for _ in range(r.randint(1, 4))) for _ in range(r.randint(1, 5))]
        text = "".join(r.choice("abc") for _ in range(r.randint(0, 14)))
        m = StopMatcher(stops)
        for end in range(len(text) + 1):
            seen, cut = text[:end], m.feed(text[:end])
            hits = [seen.find(s) for s in stops if seen.find(s) >= 0]
            if cut is not None:
                assert hits and cut == min(hits), (stops, seen, cut)
                break
            assert not hits
            held = max([k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])], default=0)
            assert m.held == held, (stops, seen)
    assert StopMatcher(["bc"]).feed("abx") is None and StopMatcher(["bc"]).feed("xabc") == 2


# ---- findings 4 (policy none), 6: shared memory -------------------------------------------------
def dead_pid() -> int:
    pid = 4194000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


def test_pause_under_none_neither_spins_nor_hangs_and_sigterm_cleans_shm(tmp_path, hf_tiny):
    """Findings 4 and 6: under `none` a held pause with queued work does not spin the engine; the
    queued request is refused (NO_CAPACITY) after capacity_wait_s, before the pause times out (round 3,
    finding 1: it waited for the pause timeout), and served once the pause timed out; stale segments
    are swept safely at start and a paused session's segment is unlinked on SIGTERM."""
    stale = f"/dev/shm/djinn-{dead_pid()}-act-stale"
    pathlib.Path(stale).write_bytes(b"x")
    os.mkdir(stale + "-dir")                    # not a file: the old sweep died on this
    try:
        d = start_daemon(tmp_path, "--model", "random:tiny", "--kv-cache-mb", "0.25", "--policy", "none",
                         "--pause-timeout-s", "4", "--capacity-wait-s", "2.5", "--host-arena-mb", "1")
        assert not os.path.exists(stale)
    finally:
        os.rmdir(stale + "-dir")
    big, small = prompts(150, 40, seed=8)
    try:
        hoarder = greeted(d.socket)
        sid = ask(hoarder, type="open_session", id=1)["session"]
        assert ask(hoarder, type="generate", id=2, session=sid, prompt_ids=big, max_new_tokens=50,
                   breakpoints=[{"layer": 0}])["type"] == "paused"
        result, waiting = {}, libdjinn.connect(d.socket).session()
        started = time.monotonic()

        def wait():
            with pytest.raises(libdjinn.NoCapacity, match="none can be freed"):
                waiting.generate(prompt_ids=small, max_new_tokens=20, ignore_eos=True)
            result["refused_after"] = time.monotonic() - started
        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        engine = psutil.Process(d.proc.pid)
        cpu = sum(engine.cpu_times()[:2])
        time.sleep(1.5)
        assert sum(engine.cpu_times()[:2]) - cpu < 0.5      # was: a 1 kHz spin
        waiter.join(15)
        assert 2.4 < result["refused_after"] < 3.9         # capacity_wait_s 2.5, before the pause timeout (4)
        assert read_frame(hoarder)["code"] == ErrorCode.TIMEOUT
        assert waiting.generate(prompt_ids=small, max_new_tokens=20, ignore_eos=True).tokens == \
            hf_greedy(hf_tiny, small, 20)
        assert ask(hoarder, type="generate", id=3, session=sid, prompt_ids=small[:5], max_new_tokens=2,
                   breakpoints=[{"layer": 1}])["type"] == "paused"
        pid = d.proc.pid
        d.proc.terminate()
        assert d.proc.wait(20) == 0
        assert [n for n in os.listdir("/dev/shm") if n.startswith(f"djinn-{pid}-")] == []
    finally:
        stop_daemon(d)


# ---- finding 6 and 8: start-up mistakes are one line, before the model loads --------------------
def test_startup_mistakes_are_one_line_errors(tmp_path, limited):
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    open_folder.chmod(0o777)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("memory: {kv_cache_mb: [1,\n")
    cases = {
        "socket folder": (["--socket", str(open_folder / "d.sock")], "writable by other users"),
        "socket in use": (["--socket", limited.socket], "already listens"),
        "shm": (["--host-arena-mb", "100000000"], "/dev/shm"),
        **({} if torch.cuda.is_available() else {"cuda": (["--device", "cuda"], "CUDA is not available")}),
        "model": (["--model", str(tmp_path / "no-model")], "no such model folder"),
        "yaml": (["--config", str(bad_yaml)], "not valid YAML"),
        "weights budget": (["--weights-budget-mb", "0.01"], "weights_budget_mb"),   # round 3, finding 7
    }
    procs = {}
    for name, (flags, _) in cases.items():
        base = [] if "--socket" in flags else ["--socket", str(tmp_path / name.replace(" ", "_") / "d.sock")]
        model = [] if "--model" in flags else ["--model", "random:tiny"]
        procs[name] = subprocess.Popen([sys.executable, "-m", "djinnd", *base, *model, *flags], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, (flags, expected) in cases.items():
        out, err = procs[name].communicate(timeout=120)
        assert procs[name].returncode == 2, (name, out, err)
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert "ready" not in out
