"""`Local`: one real `fal-operator local` process (gateway + autoscaler + replicas as
`fal-sidecar run` processes) on loopback ports, for tests/local and tests/soak.

Binaries: FAL_OPERATOR_BIN and FAL_SIDECAR_BIN (scripts/test.sh exports both), else
<repo>/target/debug/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))

from helpers import REPO, descendants, free_port, wait_until  # noqa: E402

OPERATOR_BIN = Path(os.environ.get("FAL_OPERATOR_BIN", REPO / "target" / "debug" / "fal-operator"))
SIDECAR_BIN = Path(os.environ.get("FAL_SIDECAR_BIN", REPO / "target" / "debug" / "fal-sidecar"))
# The example app, wrapped so each response names its replica (`x-app-port`).
APP_CMD = [sys.executable, "-u", "tests/e2e/redis_fixture.py", "app"]


def function(name: str, namespace: str = "default", *, command=None, **spec) -> dict:
    """A FalFunction manifest for local mode."""
    body = {
        "image": "example/app:1",
        "command": command or APP_CMD,
        "keepAlive": 2,
        "minReplicas": 0,
        "maxReplicas": 1,
        "maxConcurrency": 1,
    }
    body.update(spec)
    return {
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


class Local:
    """One `fal-operator local` process serving `functions`."""

    def __init__(self, workdir: Path, redis, functions: list[dict], *extra: str,
                 env: dict | None = None, webhook_retry_delays: str = "0.3,0.5,1,1,2",
                 operator_bin: Path = OPERATOR_BIN, sidecar_bin: Path = SIDECAR_BIN):
        """`redis`: anything with a `url` (a RedisServer, a RedisCluster)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.manifest = self.workdir / "functions.yaml"
        self.manifest.write_text(yaml.safe_dump_all(functions))
        self.redis = redis
        self.run_port, self.queue_port, self.admin_port = free_port(), free_port(), free_port()
        self.extra = list(extra)
        self.env = env or {}
        self.webhook_retry_delays = webhook_retry_delays
        self.operator_bin, self.sidecar_bin = operator_bin, sidecar_bin
        self.log_path = self.workdir / "local.log"
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))

    @property
    def run_url(self) -> str:
        return f"http://127.0.0.1:{self.run_port}"

    @property
    def queue_url(self) -> str:
        return f"http://127.0.0.1:{self.queue_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait: bool = True) -> "Local":
        """Spawn `fal-operator local`; with `wait`, return once its /readyz says 200."""
        # No manifest at all is fine too: functions come from `function serve --local`.
        files = ["-f", str(self.manifest)] if self.manifest.read_text().strip() not in ("", "[]") else []
        cmd = [
            str(self.operator_bin), "local", *files,
            "--store", self.redis.url,
            "--listen", f"127.0.0.1:{self.run_port}",
            "--queue-listen", f"127.0.0.1:{self.queue_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--sidecar-bin", str(self.sidecar_bin),
            "--state-dir", str(self.workdir / "state"),
            "--webhook-retry-delays", self.webhook_retry_delays,
            *self.extra,
        ]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            # Short leases so a killed replica's request is reclaimed quickly.
            "FAL_SIDECAR_LEASE": "2",
            "FAL_SIDECAR_APP_RETRY_DELAYS": "0.05,0.1,0.1",
            **self.env,
        }
        self.log = open(self.log_path, "ab", buffering=0)
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if wait:
            wait_until(self._ready, timeout=20, interval=0.05, what="fal-operator local to answer /readyz")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"fal-operator local exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return self.http.get(f"{self.admin_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, n: int = 150) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    # -- views -----------------------------------------------------------
    def functions(self) -> dict[str, dict]:
        r = self.http.get(f"{self.admin_url}/functions")
        assert r.status_code == 200, r.text
        return {f["function"]: f for f in r.json()}

    def fn(self, key: str) -> dict:
        return self.functions()[key]

    def processes(self, key: str) -> list[dict]:
        """Local replica processes of `key` (starting, ready, draining)."""
        return self.fn(key)["local"]["replicas"]

    def wait_processes(self, key: str, n: int, timeout: float = 30.0) -> list[dict]:
        found: list[list[dict]] = []

        def check():
            p = self.processes(key)
            if len(p) == n:
                found.append(p)
                return True
            return False
        wait_until(check, timeout=timeout, interval=0.05, what=f"{key} to have {n} replica processes")
        return found[-1]

    def wait_ready(self, key: str, n: int, timeout: float = 30.0) -> dict:
        return wait_until(lambda: (lambda f: f if f["readyReplicas"] == n else None)(self.fn(key)),
                          timeout=timeout, interval=0.05, what=f"{key} to have {n} ready replicas")

    # -- queue API (generation C) -------------------------------------------
    def submit(self, key: str, path: str = "test", json=None, **kw) -> httpx.Response:
        return self.http.post(f"{self.queue_url}/{key}/{path}", json={} if json is None else json, **kw)

    def submit_ok(self, key: str, path: str = "test", json=None, **kw) -> str:
        r = self.submit(key, path, json, **kw)
        assert r.status_code == 200, f"{r.status_code} {r.text}"
        return r.json()["request_id"]

    def status(self, key: str, rid: str) -> httpx.Response:
        return self.http.get(f"{self.queue_url}/{key}/requests/{rid}/status")

    def result(self, key: str, rid: str) -> httpx.Response:
        return self.http.get(f"{self.queue_url}/{key}/requests/{rid}")

    def wait_completed(self, key: str, rid: str, timeout: float = 60.0) -> dict:
        def check():
            r = self.status(key, rid)
            assert r.status_code in (200, 202), r.text
            return r.json() if r.json()["status"] == "COMPLETED" else None
        return wait_until(check, timeout=timeout, interval=0.05, what=f"{rid} to complete")

    # -- lifecycle ---------------------------------------------------------
    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            for pid in descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.http.close()
        self.log.close()
