"""Starts the real `holdfast` binary with a test configuration and stops it again.

Used by the compatibility suites (pytest) and the runnable examples. The binary is
target/debug/holdfast unless HOLDFAST_BINARY_PATH names another one.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("HOLDFAST_BINARY_PATH", ROOT / "target" / "debug" / "holdfast"))
SECRET = "compat-secret"
API_KEY = "compat-api-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running holdfast process on 127.0.0.1 with the given TOML configuration."""

    def __init__(self, config: str, port: int | None = None):
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="holdfast-compat-")
        self.config_path = pathlib.Path(self._dir.name) / "config.toml"
        self.config_path.write_text(config)
        self.log_path = pathlib.Path(self._dir.name) / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    @property
    def api(self) -> str:
        return f"{self.http}/api"

    def start(self, timeout: float = 30.0) -> "Server":
        if not BIN.exists():
            raise RuntimeError(f"{BIN} not found: build it with `cargo build --bin holdfast`")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(self.config_path), "--address", "127.0.0.1",
             "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "info"},
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"holdfast exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.http}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"holdfast not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self._log.close()
        self.proc = None
        return code

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.http}/health", timeout=5) as r:
            return json.loads(r.read())

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._dir.cleanup()


def token(user: str, ttl: int | None = None, **claims) -> str:
    import jwt  # PyJWT

    body = {"sub": user, **claims}
    if ttl is not None:
        body["exp"] = int(time.time()) + ttl
    return jwt.encode(body, SECRET, algorithm="HS256")
