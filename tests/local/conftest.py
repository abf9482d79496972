"""Fixtures for the scale-to-zero tests: a real `redis-server`, a real
`fal-operator local` (gateway + autoscaler + replicas as `fal-sidecar run`
processes) in front of the example app, all on loopback.

Binaries: FAL_OPERATOR_BIN and FAL_SIDECAR_BIN (scripts/test.sh exports both), else
<repo>/target/debug/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wallclock  # noqa: E402  (tests/wallclock.py)
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))

from helpers import REPO, free_port, wait_until  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402

OPERATOR_BIN = Path(os.environ.get("FAL_OPERATOR_BIN", REPO / "target" / "debug" / "fal-operator"))
SIDECAR_BIN = Path(os.environ.get("FAL_SIDECAR_BIN", REPO / "target" / "debug" / "fal-sidecar"))
TEST_TIMEOUT = float(os.environ.get("E2E_TEST_TIMEOUT", "180"))
# The example app, wrapped so each response names its replica (`x-app-port`).
APP_CMD = [sys.executable, "-u", "tests/e2e/redis_fixture.py", "app"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with wallclock.limit(TEST_TIMEOUT, "E2E_TEST_TIMEOUT"):
        yield


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


class Local:
    """One `fal-operator local` process serving `functions`."""

    def __init__(self, workdir: Path, redis: RedisServer, functions: list[dict], *extra: str,
                 env: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.manifest = self.workdir / "functions.yaml"
        self.manifest.write_text(yaml.safe_dump_all(functions))
        self.redis = redis
        self.run_port, self.queue_port, self.admin_port = free_port(), free_port(), free_port()
        self.extra = list(extra)
        self.env = env or {}
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
            str(OPERATOR_BIN), "local", *files,
            "--store", self.redis.url,
            "--listen", f"127.0.0.1:{self.run_port}",
            "--queue-listen", f"127.0.0.1:{self.queue_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--sidecar-bin", str(SIDECAR_BIN),
            "--state-dir", str(self.workdir / "state"),
            "--webhook-retry-delays", "0.3,0.5,1,1,2",
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


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.close()


@pytest.fixture
def make_local(request, tmp_path, redis):
    made: list[Local] = []

    def factory(functions: list[dict], *extra: str, env: dict | None = None, start: bool = True) -> Local:
        loc = Local(tmp_path / f"local{len(made)}", redis, functions, *extra, env=env)
        made.append(loc)
        if start:
            loc.start()
        return loc

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for loc in made:
        if failed is not None and failed.failed:
            print(f"--- fal-operator local log ({loc.log_path}) ---\n{loc.log_tail(300)}")
        loc.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
