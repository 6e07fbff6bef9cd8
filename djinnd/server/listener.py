"""The Unix-domain socket: accept (or take systemd's socket), identify the peer (SO_PEERCRED), cap
connections, read frames, hand them to a Connection, and release the peer's sessions when it goes
away. A client can never crash this, and a client that stops reading stalls only itself."""
import asyncio
import grp
import itertools
import logging
import os
import pwd
import socket
import struct
import time
from collections import Counter

from djinnd.engine import commands as cmd
from djinnd.server.handlers import Connection
from djinnd.server.systemd import inherited_socket
from libdjinn.paths import untrusted_folder
from libdjinn.protocol import HEADER, ErrorCode, ProtocolError, check_request, decode_body, encode_frame, error_reply

log = logging.getLogger("djinnd.server")
WRITE_HIGH_WATER = 1 << 20   # stop reading a client's requests while this much of its replies is unread


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel saw it at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def may_connect(uid: int, gid: int, group: str) -> bool:
    """The daemon's uid, root, or (when server.allowed_group is set) a member of that group."""
    if uid in (os.getuid(), 0):
        return True
    if not group:
        return False
    g = grp.getgrnam(group)
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    return gid == g.gr_gid or name in g.gr_mem


class Throttled:
    """Logs one line per kind of message at most every `period` s, counting what it held back."""

    def __init__(self, period: float = 10.0):
        self.period, self.last, self.held = period, {}, {}

    def __call__(self, key: str, text: str, level=logging.WARNING):
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.period:
            self.held[key] = self.held.get(key, 0) + 1
            return
        held = self.held.pop(key, 0)
        self.last[key] = now
        log.log(level, "%s%s", text, f" ({held} more like it in the last {self.period:g} s)" if held else "")


class Listener:
    def __init__(self, path: str, config, inbox, loaded):
        self.path, self.config, self.inbox, self.loaded = path, config, inbox, loaded
        self._ids = itertools.count(1)
        self.server = None
        self.inherited = False
        self.num_connections = 0
        self.by_uid, self.by_pid = Counter(), Counter()     # connections held, per peer uid and pid
        self.throttled = Throttled()

    async def start(self):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: self.throttled(ctx.get("message", "?"),
                                                                 f"event loop: {ctx.get('message')}: {ctx.get('exception')}"))
        sock = inherited_socket()
        if sock is not None:
            self.inherited, self.path = True, sock.getsockname() or self.path
            self.server = await asyncio.start_unix_server(self._serve, sock=sock)
            return
        prepare_socket_path(self.path, self.config.server.allowed_group)
        self.server = await asyncio.start_unix_server(self._serve, path=self.path, backlog=128)
        os.chmod(self.path, int(self.config.server.socket_mode, 8))
        if self.config.server.allowed_group:
            os.chown(self.path, -1, grp.getgrnam(self.config.server.allowed_group).gr_gid)

    async def close(self):
        if self.server:
            self.server.close()
        if not self.inherited and os.path.exists(self.path):
            os.unlink(self.path)

    async def _serve(self, reader, writer):
        pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
        limits = self.config.server
        conn = Connection(next(self._ids), pid, writer, self.inbox, self.loaded, asyncio.get_running_loop(),
                          uid, limits, gid)
        refusal = self._refusal(uid, gid, pid)
        if refusal:
            self.throttled(f"refused-{refusal[0]}", f"refused pid {pid} uid {uid}: {refusal[1]}")
            conn.send(error_reply(None, *refusal))
            await hang_up(reader, writer)
            return
        self.num_connections += 1
        self.by_uid[uid] += 1
        self.by_pid[pid] += 1
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        conn.on_overflow = lambda unread: self._cut_off(conn, writer, unread)
        try:
            await self._frames(reader, writer, conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass        # the client went away, maybe mid-frame or mid-generation
        except Exception:
            log.exception("connection %d (pid %d) failed", conn.id, pid)
        finally:
            self.num_connections -= 1
            for held, key in ((self.by_uid, uid), (self.by_pid, pid)):
                held[key] -= 1
                if not held[key]:
                    del held[key]
            self.inbox.put(cmd.ReleaseOwner(conn.id))
            writer.close()
            conn.closed()

    def _refusal(self, uid: int, gid: int, pid: int) -> tuple[ErrorCode, str] | None:
        limits = self.config.server
        if not may_connect(uid, gid, limits.allowed_group):
            group = f" or members of group {limits.allowed_group!r}" if limits.allowed_group else ""
            return ErrorCode.PERMISSION_DENIED, f"uid {uid} may not use this daemon (only uid {os.getuid()}, root{group})"
        if self.num_connections >= limits.max_connections:
            return ErrorCode.LIMIT, (f"the daemon already serves {limits.max_connections} connections "
                                     "(server.max_connections); try again later")
        if self.by_uid[uid] >= limits.max_connections_per_uid:
            return ErrorCode.LIMIT, (f"uid {uid} already holds {limits.max_connections_per_uid} connections "
                                     "(server.max_connections_per_uid); close some first")
        if self.by_pid[pid] >= limits.max_connections_per_pid:
            return ErrorCode.LIMIT, (f"process {pid} already holds {limits.max_connections_per_pid} connections "
                                     "(server.max_connections_per_pid); share one connection between threads")
        return None

    def _cut_off(self, conn: Connection, writer, unread: int):
        self.throttled("cut-off", f"connection {conn.id} (pid {conn.pid}) left {unread} reply bytes unread "
                                  f"(server.max_unread_reply_mb); closing it")
        writer.transport.abort()

    async def _frames(self, reader, writer, conn: Connection):
        limit = self.config.server.max_frame_bytes
        while True:
            (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
            if size > limit:  # the stream cannot be trusted past a bad header: answer, then hang up
                writer.write(encode_frame(error_reply(None, ErrorCode.FRAME_TOO_LARGE,
                                                      f"frame of {size} bytes exceeds the limit of {limit}")))
                await drain(writer)
                return
            body = await reader.readexactly(size)
            rid, counted = None, False
            try:
                message = decode_body(body)
                rid = message.get("id")
                fields = check_request(message)
                counted = True
                conn.handle(message["type"], rid, fields)
            except ProtocolError as e:
                conn.send(error_reply(rid if isinstance(rid, int) else None, e.code, e.message), counted)
            except Exception as e:  # a bug costs this request, not the connection or the daemon
                self.throttled("request-bug", f"request {rid!r} failed: {type(e).__name__}: {e}", logging.ERROR)
                conn.send(error_reply(rid if isinstance(rid, int) else None, ErrorCode.INTERNAL, repr(e)), counted)
            await drain(writer)      # back-pressure: no new requests while its replies sit unread


async def hang_up(reader, writer):
    """Close a refused connection so that its client reads the error frame: shut our side, take
    what it sent meanwhile (a socket closed with unread data resets the peer), then close."""
    await drain(writer)
    try:
        writer.write_eof()
        await asyncio.wait_for(reader.read(1 << 16), 1.0)
    except (OSError, asyncio.TimeoutError):
        pass
    writer.close()


async def drain(writer):
    try:
        await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


def prepare_socket_path(path: str, group: str = ""):
    """Make the socket's folder (private to us, or to us and `group`), refuse one another user could
    control, and clear a stale socket that nobody answers on."""
    folder = os.path.dirname(path) or "."
    why = untrusted_folder(folder)
    if why:
        raise RuntimeError(f"socket folder {why}; remove it or choose another path with --socket")
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o750 if group else 0o700)
        if group:
            os.chown(folder, -1, grp.getgrnam(group).gr_gid)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            raise RuntimeError(f"another djinnd already listens on {path}; stop it, or pass another --socket")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
