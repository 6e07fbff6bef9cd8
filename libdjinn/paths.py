"""Where the daemon's socket lives: DJINN_SOCKET, else the user's runtime dir, else /run/djinn."""
import os


def default_socket_path() -> str:
    if os.environ.get("DJINN_SOCKET"):
        return os.environ["DJINN_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "djinn", "djinnd.sock")
    if os.geteuid() == 0:
        return "/run/djinn/djinnd.sock"
    return f"/tmp/djinn-{os.getuid()}/djinnd.sock"
