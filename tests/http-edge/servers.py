"""The servers the corpus is sent to, each with a recording backend behind it:

- nginx (the distribution's package) as a reverse proxy in front of recording_app.py;
- Go's net/http (goserver/main.go, built once per source and Go version, cached outside
  the clone);
- `fal-sidecar run` with recording_app.py as its app (run, queue, run-host and admin
  listeners), started with tests/e2e's `Sidecar`;
- `fal-operator local` whose corpus function's replica runs recording_app.py (the
  gateway's run, queue and admin listeners; the function is reached by Host), started
  with tests/local's `Local`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))
sys.path.insert(0, str(HERE.parent / "local"))

from helpers import Sidecar, free_port, wait_until  # noqa: E402
from redis_fixture import RedisServer  # noqa: E402
import local_proc as local  # noqa: E402  (`Local`, `function`)

from corpus import HOST  # noqa: E402
from edge import Records  # noqa: E402



RECORDING_APP = HERE / "recording_app.py"
GO = os.environ.get("GO") or shutil.which("go") or "/usr/local/go/bin/go"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CACHE = (Path(os.environ["FAL_CLUSTER_CACHE"]) if os.environ.get("FAL_CLUSTER_CACHE")
         else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fal-serverless") / "http-edge"


def _ready(url: str, **kw) -> bool:
    try:
        return httpx.get(url, timeout=1, **kw).status_code == 200
    except httpx.HTTPError:
        return False


class RecordingApp:
    """recording_app.py on its own port (nginx's backend)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.records = Records(workdir / "records.jsonl")
        self.proc = subprocess.Popen([sys.executable, "-u", str(RECORDING_APP), str(self.records.path),
                                      str(self.port)], stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: _ready(f"http://127.0.0.1:{self.port}/-probe"), timeout=10, what="the recording app")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def nginx_version() -> str | None:
    if not Path(NGINX).is_file():
        return None
    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


class Nginx:
    name = "nginx"

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.backend = RecordingApp(workdir)
        self.records = self.backend.records
        self.port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""\
            worker_processes 1;
            error_log {workdir}/error.log info;
            pid {workdir}/nginx.pid;
            events {{ worker_connections 1024; }}
            http {{
              access_log off;
              client_body_temp_path {workdir}/body;
              proxy_temp_path {workdir}/proxy;
              fastcgi_temp_path {workdir}/fastcgi;
              uwsgi_temp_path {workdir}/uwsgi;
              scgi_temp_path {workdir}/scgi;
              upstream backend {{ server 127.0.0.1:{self.backend.port}; keepalive 16; }}
              server {{
                listen 127.0.0.1:{self.port};
                location / {{
                  proxy_pass http://backend;
                  proxy_http_version 1.1;
                  proxy_set_header Connection "";
                }}
              }}
            }}
            """))
        # -e: the package's compiled-in error log (/var/log/nginx) may not be writable.
        self.proc = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log"),
                                      "-g", "daemon off;"], stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: _ready(f"http://127.0.0.1:{self.port}/-probe"), timeout=10, what="nginx")

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.backend.close()


def go_version() -> str | None:
    if not Path(GO).is_file():
        return None
    out = subprocess.run([GO, "env", "GOVERSION"], capture_output=True, text=True,
                         env={**os.environ, "GOTOOLCHAIN": "local"})
    return out.stdout.strip() or None


def go_binary() -> Path:
    """goserver/main.go built with the local Go, cached by source and Go version."""
    src = HERE / "goserver"
    h = hashlib.sha256()
    for f in ("main.go", "go.mod"):
        h.update((src / f).read_bytes())
    h.update((go_version() or "").encode())
    out = CACHE / f"goserver-{h.hexdigest()[:16]}"
    if not out.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        subprocess.run([GO, "build", "-trimpath", "-o", str(tmp), "."], cwd=src, check=True,
                       env={**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"})
        tmp.rename(out)
    return out


class GoServer:
    name = "go"

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.records = Records(workdir / "records.jsonl")
        self.port = free_port()
        self.proc = subprocess.Popen([str(go_binary()), str(self.records.path), f"127.0.0.1:{self.port}"],
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: _ready(f"http://127.0.0.1:{self.port}/-probe"), timeout=10, what="the Go server")

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class SidecarTarget:
    """`fal-sidecar run` with the recording app; its four listeners. Only the run
    listener reaches the app with the corpus' paths."""

    backend_listener = "run"

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.records = Records(workdir / "records.jsonl")
        self.run_host_port = free_port()
        self.sc = Sidecar(workdir, ["--run-host-listen", f"127.0.0.1:{self.run_host_port}"], name="edge-sidecar",
                          app_cmd=[sys.executable, "-u", str(RECORDING_APP), str(self.records.path)])
        self.sc.start()

    @property
    def listeners(self) -> dict[str, tuple[str, int]]:
        return {"run": ("127.0.0.1", self.sc.listen_port), "queue": ("127.0.0.1", self.sc.queue_port),
                "run-host": ("127.0.0.1", self.run_host_port), "admin": ("127.0.0.1", self.sc.admin_port)}

    def alive(self) -> bool:
        return self.sc.running and _ready(f"{self.sc.admin_url}/healthz")

    def log(self) -> str:
        return self.sc.log_tail(300)

    def close(self) -> None:
        self.sc.close()


class GatewayTarget:
    """`fal-operator local --domain edge.test` serving the corpus function `default/edge`
    (one replica kept warm) whose app is the recording app. Only the run listener
    reaches the app with the corpus' paths (by Host)."""

    backend_listener = "run"

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(workdir / "redis").start()
        self.records = Records(workdir / "records.jsonl")
        name, ns, domain = HOST.split(".", 2)
        fn = local.function(name, ns, command=[sys.executable, "-u", str(RECORDING_APP), str(self.records.path)],
                            minReplicas=1, maxReplicas=1, maxConcurrency=64, keepAlive=600)
        self.local = local.Local(workdir / "local", self.redis, [fn], "--domain", domain)
        try:
            self.local.start()
            wait_until(lambda: _ready(f"{self.local.run_url}/-probe", headers={"host": HOST}), timeout=60,
                       what="the gateway to answer through the corpus function")
        except BaseException:
            self.close()
            raise

    @property
    def listeners(self) -> dict[str, tuple[str, int]]:
        return {"run": ("127.0.0.1", self.local.run_port), "queue": ("127.0.0.1", self.local.queue_port),
                "admin": ("127.0.0.1", self.local.admin_port)}

    def alive(self) -> bool:
        return self.local.proc.poll() is None and _ready(f"{self.local.admin_url}/healthz")

    def log(self) -> str:
        return self.local.log_tail(300)

    def close(self) -> None:
        self.local.close()
        self.redis.close()
