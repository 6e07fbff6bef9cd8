"""Shared by the experiments: start a real djinnd on a private socket, stamp results."""
import datetime
import functools
import importlib.metadata
import json
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
    """SIGTERM, and SIGKILL if it is not gone in 30 s: the next daemon needs its device memory."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def stamp() -> dict:
    """What every result JSON records: date, commit, torch, and the GPU (None without CUDA).
    DJINN_COMMIT names the commit where git cannot: a copy of the tree without its .git (as the
    lent GPU runs) reports whatever checkout lies above it."""
    sha = os.environ.get("DJINN_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                           capture_output=True, text=True, cwd=ROOT).stdout
    gpu = device_info()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": sha.strip(), "host_cpus": os.cpu_count(), "torch": importlib.metadata.version("torch"),
            "gpu": gpu and gpu["name"]}


@functools.cache
def device_info() -> dict | None:
    """The first GPU's name, total and free bytes, asked in a child process so that this one holds
    no CUDA context (~0.5 GiB) while the daemon runs. None without CUDA."""
    probe = ("import json, torch; ok = torch.cuda.is_available(); free, total = torch.cuda.mem_get_info() if ok "
             "else (0, 0); print(json.dumps({'name': torch.cuda.get_device_name(), 'free': free, 'total': total} "
             "if ok else None))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None


def host_memory() -> dict:
    """Host RAM and /dev/shm free bytes: what the host arena can take."""
    with open("/proc/meminfo") as fh:
        total = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    st = os.statvfs("/dev/shm")
    return {"ram_total": total, "shm_free": st.f_bavail * st.f_frsize}
