"""Shared by the experiments: start a real djinnd on a private socket, stamp results."""
import datetime
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_daemon(*flags, log=None) -> tuple[subprocess.Popen, str]:
    """A djinnd process with the given flags; returns it and its socket once it is ready."""
    socket_path = os.path.join(tempfile.mkdtemp(prefix="djinn-exp-"), "djinnd.sock")
    proc = subprocess.Popen([sys.executable, "-m", "djinnd", "--socket", socket_path, *flags],
                            stdout=subprocess.PIPE, stderr=log or sys.stderr, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("djinnd: ready"):
            return proc, socket_path
    raise RuntimeError(f"djinnd {' '.join(flags)} exited before it was ready")


def stop_daemon(proc: subprocess.Popen):
    proc.terminate()
    proc.wait(30)


def stamp() -> dict:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": sha.strip(), "host_cpus": os.cpu_count()}
