"""Helpers for the Redis-backend end-to-end tests: a `redis-server` process on a free
loopback port (AOF on, its own dir), sidecars that share one queue in it, and an app
wrapper whose responses name the process that answered (`x-app-port`).

Run the wrapper as `python redis_fixture.py app`: it is examples/app.py with one
change, every response carries `x-app-port: $PORT`, so a stored result tells which
replica's app produced it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import APP, free_port, wait_until

REDIS_SERVER = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
FUNCTION = "default/app"


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One RESP command over a raw socket (no client library needed); returns the raw reply."""
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        payload += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


class RedisServer:
    """`redis-server` with AOF in `workdir`; stop()/start() keep port and data."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec",
                "--logfile", str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self.ping, timeout=timeout, interval=0.02, what=f"redis-server on {self.port}")
        return self

    def ping(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return redis_command(self.port, "PING").startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: redis fsyncs the AOF and exits)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def app_cmd() -> list[str]:
    """The example app, wrapped so every response names its port."""
    return [sys.executable, "-u", str(Path(__file__).resolve()), "app"]


def redis_args(server: RedisServer, *extra: str, function: str = FUNCTION) -> list[str]:
    return ["--store", server.url, "--function", function, *extra]


def signing_key(path: Path) -> Path:
    """One webhook key for every replica of a test (the receiver checks one JWKS)."""
    path.write_text(os.urandom(32).hex())
    return path


def _run_app() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fal_example_app", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    port = os.environ.get("PORT", "8000")
    original = mod.Handler._send

    def _send(self, status, body, content_type="application/json", headers=None):
        headers = dict(headers or {})
        headers["x-app-port"] = port
        return original(self, status, body, content_type, headers)

    mod.Handler._send = _send
    mod.main()


if __name__ == "__main__":
    if sys.argv[1:] == ["app"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        _run_app()
    else:
        sys.exit("usage: redis_fixture.py app")
