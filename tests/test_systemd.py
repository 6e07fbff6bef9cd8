"""The system service: the units verify and rate <= 4.0 in `systemd-analyze security`, and the daemon
serves on a socket handed over as systemd does (LISTEN_FDS), with READY=1 and watchdog pings."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import libdjinn
from conftest import ROOT

ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 4.0


@pytest.fixture
def units(tmp_path):
    """The units as `make install-service` writes them (an existing executable for @DJINND@)."""
    djinnd = shutil.which("djinnd") or sys.executable
    service = open(os.path.join(ROOT, "systemd", "djinnd.service")).read().replace("@DJINND@", djinnd)
    (tmp_path / "djinnd.service").write_text(service)
    shutil.copy(os.path.join(ROOT, "systemd", "djinnd.socket"), tmp_path / "djinnd.socket")
    return tmp_path


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_verify_and_rate_at_most_4(units):
    verify = subprocess.run([ANALYZE, "verify", "djinnd.service", "djinnd.socket"], cwd=units,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([ANALYZE, "security", "--offline=yes", "./djinnd.service"], cwd=units,
                              capture_output=True, text=True, timeout=120)
    exposure = float(re.search(r"Overall exposure level for djinnd.service: ([\d.]+)", security.stdout).group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, security.stdout[-3000:]


def test_socket_activation_readiness_and_watchdog(tmp_path):
    """The daemon accepts on the inherited fd 3, says READY=1 and pings the watchdog from its engine loop."""
    path = str(tmp_path / "djinnd.sock")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(path)
    listening.listen()
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(120)
    fd = listening.fileno()
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000", "LISTEN_FDS": "1"}
    argv = [sys.executable, "-m", "djinnd", "--model", "random:tiny", "--device", "cpu", "--kv-cache-mb", "4",
            "--host-arena-mb", "16", "--socket", f"{tmp_path}/unused/d.sock"]
    launch = (f"import os, sys; os.dup2({fd}, 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
              f"os.execv(sys.executable, {argv!r})")      # what systemd does: fd 3, our pid, exec
    proc = subprocess.Popen([sys.executable, "-c", launch], pass_fds=(fd,), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listening.close()
    try:
        messages = []
        while "READY=1" not in messages:
            messages.append(notify.recv(256).decode())
        with libdjinn.connect(path, timeout=30) as djinn:
            assert len(djinn.session().generate(prompt_ids=[1, 2, 3], max_new_tokens=3, ignore_eos=True).tokens) == 3
        started, pings = time.monotonic(), 0
        while pings < 3:
            pings += notify.recv(256) == b"WATCHDOG=1"
        assert time.monotonic() - started < 5
        assert not os.path.exists(tmp_path / "unused")      # it did not make a socket of its own
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert os.path.exists(path)                   # the socket belongs to systemd: left in place
