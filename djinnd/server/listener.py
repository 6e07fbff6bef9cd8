"""The Unix-domain socket: accept, identify the peer (SO_PEERCRED), read frames, hand them to a
Connection, and release the peer's sessions when it goes away. A client can never crash this."""
import asyncio
import itertools
import logging
import os
import socket
import struct

from djinnd.engine import commands as cmd
from djinnd.server.handlers import Connection
from libdjinn.protocol import HEADER, ErrorCode, ProtocolError, check_request, decode_body, encode_frame, error_reply

log = logging.getLogger("djinnd.server")


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel saw it at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class Listener:
    def __init__(self, path: str, config, inbox, loaded):
        self.path, self.config, self.inbox, self.loaded = path, config, inbox, loaded
        self._ids = itertools.count(1)
        self.server = None

    async def start(self):
        prepare_socket_path(self.path)
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, int(self.config.server.socket_mode, 8))

    async def close(self):
        if self.server:
            self.server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _serve(self, reader, writer):
        pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
        conn = Connection(next(self._ids), pid, writer, self.inbox, self.loaded, asyncio.get_running_loop())
        if uid not in (os.getuid(), 0):
            conn.send(error_reply(None, ErrorCode.PERMISSION_DENIED, f"uid {uid} may not use this daemon"))
            await drain(writer)
            writer.close()
            return
        try:
            await self._frames(reader, writer, conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass        # the client went away, maybe mid-frame or mid-generation
        except Exception:
            log.exception("connection %d (pid %d) failed", conn.id, pid)
        finally:
            self.inbox.put(cmd.ReleaseOwner(conn.id))
            writer.close()

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
            rid = None
            try:
                message = decode_body(body)
                rid = message.get("id")
                conn.handle(message["type"], rid, check_request(message))
            except ProtocolError as e:
                conn.send(error_reply(rid if isinstance(rid, int) else None, e.code, e.message))
            except Exception as e:  # a bug costs this request, not the connection or the daemon
                log.exception("request %r failed", rid)
                conn.send(error_reply(rid if isinstance(rid, int) else None, ErrorCode.INTERNAL, repr(e)))
            await drain(writer)


async def drain(writer):
    try:
        await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


def prepare_socket_path(path: str):
    """Make the socket's folder private to us and clear a stale socket that nobody answers on."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            raise RuntimeError(f"another djinnd already listens on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
