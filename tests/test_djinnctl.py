"""djinnctl status: what a person and a script see of a running daemon."""
import json
import os
import subprocess
import sys

import libdjinn


def djinnctl(*args):
    return subprocess.run([sys.executable, "-m", "libdjinn.ctl", *args], capture_output=True, text=True, timeout=60)


def test_status_shows_model_memory_and_sessions(tiny_daemon):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        session = djinn.session()
        session.generate(prompt_ids=[1, 2, 3], max_new_tokens=4, ignore_eos=True)
        report = json.loads(djinnctl("--socket", tiny_daemon.socket, "status", "--json").stdout)
        text = djinnctl("--socket", tiny_daemon.socket, "status").stdout
    mine = [s for s in report["sessions"] if s["id"] == session.id]
    assert mine and mine[0]["owner_pid"] == os.getpid() and mine[0]["tokens"] == 7
    assert mine[0]["kv_where"] == "device" and mine[0]["state"] == "idle"
    assert report["model"]["random_weights"] and report["memory"]["kv_blocks_used"] >= 1
    assert "RANDOM WEIGHTS" in text and f"{os.getpid():>7}" in text and "tokens_generated" in text


def test_status_without_a_daemon_says_so(tmp_path):
    out = djinnctl("--socket", str(tmp_path / "none.sock"), "status")
    assert out.returncode == 3 and "not running" in out.stderr


def test_swaps_and_timeline_write_their_files(tiny_daemon, tmp_path):
    with libdjinn.connect(tiny_daemon.socket) as djinn:
        s = djinn.session()
        s.generate(prompt_ids=[1, 2, 3], max_new_tokens=4, ignore_eos=True)
        with s.tool_call():
            pass                                      # IO_WAIT then ACTIVE: one swap out, one back
    out = djinnctl("--socket", tiny_daemon.socket, "swaps", "--png", str(tmp_path / "swaps.png"))
    assert out.returncode == 0 and out.stdout.splitlines()[1].startswith("out")
    out = djinnctl("--socket", tiny_daemon.socket, "timeline", "--csv", str(tmp_path / "t.csv"),
                   "--png", str(tmp_path / "t.png"))
    assert out.returncode == 0, out.stderr
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("t,kv_pool_used_bytes") and len(rows) > 2
    for png in ("swaps.png", "t.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
