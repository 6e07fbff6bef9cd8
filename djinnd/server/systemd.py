"""systemd integration, stdlib only: readiness and watchdog (sd_notify) and socket activation
(LISTEN_FDS)."""
import os
import socket
import time

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send e.g. "READY=1" to $NOTIFY_SOCKET; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):          # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
    return True


def watchdog_feeder():
    """A callable that sends WATCHDOG=1 at most every half WatchdogSec; a no-op without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return lambda: None
    period, last = int(usec) / 2e6, [0.0]

    def feed():
        now = time.monotonic()
        if now - last[0] >= period:
            last[0] = now
            notify("WATCHDOG=1")
    return feed


def inherited_socket() -> socket.socket | None:
    """The listening Unix socket systemd passed us (djinnd.socket), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)          # not for our children
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise RuntimeError("systemd passed a socket that is not a Unix stream socket; check djinnd.socket")
    return sock
