"""Shared helpers for the fal-sidecar end-to-end tests: ports, polling, the
`Sidecar` process wrapper and small HTTP conveniences."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "examples" / "app.py"
SIDECAR_BIN = Path(os.environ.get("FAL_SIDECAR_BIN", REPO / "target" / "debug" / "fal-sidecar"))

# Fast schedules so the suite stays quick; individual tests may override.
FAST_WEBHOOK_RETRY = "0.3,0.3,0.5,1,1,2,2"
FAST_APP_RETRY = "0.05,0.1,0.1"

HTTP_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
TERMINAL_STATUS = "COMPLETED"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_ISSUED: set[int] = set()
_PORT_FLOOR = 10000


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, taken from BELOW the kernel's ephemeral range.

    `bind(0)` hands out ephemeral ports, the same pool every outgoing connection draws
    its local port from: between picking the port and the server binding it, a Redis
    Cluster bus link or a client could take it as its source port (CI saw exactly that:
    "Address already in use" on a port free_port had returned). Ports under the range
    are never used as source ports; each is issued once per test process so two
    consecutive calls never return the same one."""
    low = _ephemeral_low()
    if low - _PORT_FLOOR < 1000:  # an unusual range: fall back to the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    for _ in range(1000):
        port = random.randrange(_PORT_FLOOR, low)
        if port in _ISSUED:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _ISSUED.add(port)
        return port
    raise RuntimeError(f"no free port between {_PORT_FLOOR} and {low}")


def port_is_free(port: int) -> bool:
    """True when nothing listens on the port (TIME_WAIT leftovers don't count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(fn: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Call fn until it returns a truthy value; return that value. Exceptions from
    fn count as "not yet" and the last one is reported on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_val: Any = None
    while True:
        try:
            last_val = fn()
            if last_val:
                return last_val
            last_exc = None
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_exc!r}" if last_exc else f"; last value: {last_val!r}"
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def send_in_background(s: socket.socket, data: bytes) -> threading.Thread:
    """Sends `data` on `s` from a thread (an answer may come before all of it is sent);
    a send the other side refused ends it quietly."""
    def send() -> None:
        try:
            s.sendall(data)
        except OSError:
            pass
    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def new_key(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class SidecarExited(RuntimeError):
    pass


class Sidecar:
    """One `fal-sidecar run` process with the example app behind it.

    Listens on loopback ports chosen at construction; the data dir survives
    restarts, so `kill9()` + `start()` simulates a crash and recovery."""

    def __init__(
        self,
        workdir: Path,
        extra_args: Iterable[str] = (),
        *,
        name: str = "sidecar",
        app_cmd: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.data_dir = self.workdir / "data"
        self.extra_args = list(extra_args)
        self.app_cmd = app_cmd or [sys.executable, "-u", str(APP)]
        self.env = env or {}
        self.listen_port = free_port()
        self.queue_port = free_port()
        self.admin_port = free_port()
        self.app_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = self.workdir / f"{name}.log"
        self._log_file = None
        self.http = httpx.Client(timeout=HTTP_TIMEOUT)

    # -- addresses -------------------------------------------------------
    @property
    def run_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def queue_url(self) -> str:
        return f"http://127.0.0.1:{self.queue_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.run_url}/.well-known/jwks.json"

    def command(self) -> list[str]:
        return [
            str(SIDECAR_BIN),
            "run",
            "--listen", f"127.0.0.1:{self.listen_port}",
            "--queue-listen", f"127.0.0.1:{self.queue_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--app-port", str(self.app_port),
            "--data-dir", str(self.data_dir),
            *self.extra_args,
            "--",
            *self.app_cmd,
        ]

    # -- lifecycle -------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 20.0) -> "Sidecar":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"===== start #{self.starts}: {' '.join(self.command())}\n".encode())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RUST_BACKTRACE": "1", **self.env}
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(REPO),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: kill9() takes the app down too
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SidecarExited(
                    f"fal-sidecar exited with {self.proc.returncode} before becoming ready\n{self.log_tail()}"
                )
            try:
                r = self.http.get(f"{self.admin_url}/readyz", timeout=1.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"fal-sidecar not ready (GET /readyz != 200) after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 20.0, strict: bool = True) -> int | None:
        """SIGTERM the sidecar (only it, not the app) and wait for it to exit."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                if strict:
                    raise AssertionError(f"fal-sidecar did not exit within {timeout}s of SIGTERM")
                return None
        self._reap_group()
        return self.proc.returncode

    def kill9(self) -> None:
        """Crash: SIGKILL the sidecar's whole process group (sidecar and app)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        # the app exits on its own when its parent dies; make sure its port is free
        wait_until(lambda: port_is_free(self.app_port), timeout=5, what="app port to be released")

    def _reap_group(self) -> None:
        # Leftover processes of this sidecar's own group (e.g. an app it failed to stop).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def close(self) -> None:
        try:
            if self.running:
                self.terminate(timeout=10, strict=False)
            elif self.proc is not None:
                self._reap_group()
        finally:
            self.http.close()

    # -- diagnostics -----------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 200) -> str:
        lines = self.log_text().splitlines()
        return f"--- {self.name} log ({self.log_path}), last {n} lines ---\n" + "\n".join(lines[-n:])

    # -- gen C (queue host) conveniences ---------------------------------
    def submit(
        self,
        path: str = "echo",
        json: Any = None,
        *,
        endpoint: str = "test/app",
        content: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        webhook: str | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        url = f"{self.queue_url}/{endpoint}"
        if path:
            url += "/" + path.lstrip("/")
        params = dict(params or {})
        if webhook is not None:
            params["fal_webhook"] = webhook
        kwargs: dict[str, Any] = {"headers": headers or {}, "params": params}
        if content is not None:
            kwargs["content"] = content
        else:
            kwargs["json"] = {} if json is None else json
        return self.http.post(url, **kwargs)

    def submit_ok(self, path: str = "echo", json: Any = None, **kw) -> dict:
        r = self.submit(path, json, **kw)
        assert 200 <= r.status_code < 300, f"submit {path} -> {r.status_code} {r.text}"
        data = r.json()
        assert isinstance(data.get("request_id"), str) and data["request_id"], data
        return data

    def req_url(self, rid: str, endpoint: str = "test/app") -> str:
        return f"{self.queue_url}/{endpoint}/requests/{rid}"

    def status(self, rid: str, logs: Any = None, endpoint: str = "test/app") -> httpx.Response:
        params = {} if logs is None else {"logs": logs}
        return self.http.get(self.req_url(rid, endpoint) + "/status", params=params)

    def result(self, rid: str, endpoint: str = "test/app") -> httpx.Response:
        return self.http.get(self.req_url(rid, endpoint))

    def cancel(self, rid: str, endpoint: str = "test/app") -> httpx.Response:
        return self.http.put(self.req_url(rid, endpoint) + "/cancel")

    def wait_status(self, rid: str, statuses: str | tuple[str, ...], timeout: float = 15.0,
                    endpoint: str = "test/app", logs: Any = None) -> dict:
        if isinstance(statuses, str):
            statuses = (statuses,)

        def check():
            r = self.status(rid, logs=logs, endpoint=endpoint)
            assert r.status_code in (200, 202), f"status {rid} -> {r.status_code} {r.text}"
            body = r.json()
            return body if body.get("status") in statuses else None

        return wait_until(check, timeout=timeout, what=f"{rid} to reach {statuses}")

    def wait_completed(self, rid: str, timeout: float = 15.0, endpoint: str = "test/app",
                       logs: Any = None) -> dict:
        return self.wait_status(rid, TERMINAL_STATUS, timeout=timeout, endpoint=endpoint, logs=logs)

    def wait_result(self, rid: str, timeout: float = 15.0, endpoint: str = "test/app") -> httpx.Response:
        self.wait_completed(rid, timeout=timeout, endpoint=endpoint)
        return self.result(rid, endpoint=endpoint)

    # -- the app, asked directly (through the sidecar such a call would take one of
    # its --max-concurrency slots, and be refused while the requests fill them) -----
    def app_seen(self) -> list[dict]:
        r = self.http.get(f"http://127.0.0.1:{self.app_port}/seen")
        assert r.status_code == 200, r.text
        return r.json()

    def app_calls(self, key: str) -> int:
        r = self.http.get(f"http://127.0.0.1:{self.app_port}/calls", params={"key": key})
        assert r.status_code == 200, r.text
        return r.json()["calls"]

    def wait_app_saw(self, path: str, request_id: str, timeout: float = 10.0) -> dict:
        def check():
            for entry in self.app_seen():
                if entry["path"] == path and entry["x-fal-request-id"] == request_id:
                    return entry
            return None

        return wait_until(check, timeout=timeout, what=f"app to receive {path} for {request_id}")

    def wait_running_in_app(self, path: str, rid: str, timeout: float = 10.0) -> None:
        """Wait until the request is IN_PROGRESS and the app has received it."""
        self.wait_app_saw(path, rid, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (via /proc/*/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
