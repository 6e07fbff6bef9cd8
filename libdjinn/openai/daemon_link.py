"""The front's one connection to djinnd, opened lazily and again after the daemon comes back, and the
daemon's tokenizer loaded from the directory its hello names (same machine, no network)."""
import threading

import libdjinn


class DaemonDown(Exception):
    pass


class DaemonLink:
    def __init__(self, socket_path: str | None, tokenizer_dir: str | None = None):
        self.socket_path, self.tokenizer_dir = socket_path, tokenizer_dir
        self.conn: libdjinn.Connection | None = None
        self.tokenizer = None
        self.max_model_len = 0
        self.on_reset = lambda: None       # the front forgets its conversations: their sessions died
        self._lock = threading.Lock()

    def connection(self) -> libdjinn.Connection:
        with self._lock:
            if self.conn is not None and self.conn._closed is None:
                return self.conn
            if self.conn is not None:
                self._reset()
            try:
                conn = libdjinn.Connection(self.socket_path)
                status = conn.status()
            except (OSError, ConnectionError) as e:
                raise DaemonDown(f"djinnd does not answer on {self.socket_path or 'the default socket'}: {e}")
            self.max_model_len = status["model"]["max_model_len"]
            self._load_tokenizer(self.tokenizer_dir or conn.info.get("tokenizer_dir"))
            self.conn = conn
            return conn

    def _load_tokenizer(self, path: str | None):
        if path and self.tokenizer is None:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(path)

    def lost(self, error: Exception):
        """A request failed because the daemon went away."""
        with self._lock:
            if self.conn is not None:
                self._reset()
        raise DaemonDown(f"lost the connection to djinnd: {error}") from None

    def _reset(self):
        self.conn.close()
        self.conn = None
        self.on_reset()

    def status(self) -> dict:
        try:
            return self.connection().status()
        except ConnectionError as e:
            self.lost(e)
