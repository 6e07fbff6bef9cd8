"""Where the daemon's socket lives: DJINN_SOCKET, else the user's runtime dir, else /run/djinn,
else /tmp/djinn-$UID; and whether a socket folder can be trusted."""
import os
import stat


def default_socket_path() -> str:
    if os.environ.get("DJINN_SOCKET"):
        return os.environ["DJINN_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "djinn", "djinnd.sock")
    if os.geteuid() == 0:
        return "/run/djinn/djinnd.sock"
    return tmp_socket_path()


def tmp_socket_path() -> str:
    return f"/tmp/djinn-{os.getuid()}/djinnd.sock"


def untrusted_folder(folder: str) -> str | None:
    """Why another local user could control `folder` (None when only we or root can): it must be a
    real directory owned by this uid or root, and not writable by group or others."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a directory (a symlink or a file)"
    if st.st_uid not in (os.getuid(), 0):
        return f"{folder} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & 0o022 and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):   # /tmp itself is fine
        return f"{folder} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
