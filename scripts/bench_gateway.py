#!/usr/bin/env python3
"""Scale-to-zero benchmarks, each against a baseline measured in the same run
(scripts/bench-gateway.sh builds the release binaries and calls this):

1. cold start in local mode: submit/sync call at zero → the app receives it, minus the
   baseline "spawn the app → its port accepts" (the part no gateway can save);
2. wake latency: submit at zero → the autoscaler's decision (the replica's spawn);
3. warm sync calls through the gateway vs straight to the replica's sidecar (wrk);
4. queue submits through the gateway vs through a replica's sidecar, same Redis (wrk);
5. RSS of an idle `fal-operator local` knowing 1,000 functions (gateway + autoscaler).

Everything runs on loopback: redis-server, nginx as the fast app, the example app.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(fn, timeout=30.0, interval=0.002, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post(url: str, body: bytes = b"{}") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, dict(r.headers), r.read()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


WRAPPER = r'''
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("app", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
orig = mod.Handler._send
def _send(self, status, body, content_type="application/json", headers=None):
    headers = dict(headers or {}); headers["x-arrived"] = repr(self.server.arrived)
    return orig(self, status, body, content_type, headers)
mod.Handler._send = _send
orig_handle = mod.Handler.handle_one_request
def handle_one_request(self):
    self.server.arrived = time.time()
    return orig_handle(self)
mod.Handler.handle_one_request = handle_one_request
mod.main()
'''

NGINX_TMPL = """worker_processes 1;
error_log {dir}/error-@PORT@.log warn;
pid {dir}/nginx-@PORT@.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:@PORT@; location / {{ return 200 "ok\\n"; }} }}
}}
"""


def wrk(url: str, duration: int, conns: int, script: str | None = None,
        headers: tuple[str, ...] = ()) -> tuple[float, float, float]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency"]
    if script:
        cmd += ["-s", script]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def lat(label):
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errs and script is None:
        raise SystemExit(f"wrk saw errors against {url}:\n{out}")
    return rps, lat("50"), lat("99")


class Procs:
    """The processes of one benchmark run, each in its own session (a local's replicas
    go with it); stop() ends them all."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def switches(pids) -> tuple[int, int]:
    """(voluntary, involuntary) context switches so far of every thread of `pids`: a
    voluntary one is a sleep (nothing to do), an involuntary one a preemption."""
    vol = invol = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                st = (task / "status").read_text()
            except OSError:
                continue
            vol += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", st, re.M).group(1))
            invol += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", st, re.M).group(1))
    return vol, invol


def start_redis(procs: "Procs", work: Path) -> int:
    """A throwaway redis-server (no persistence) on a free port; returns once it accepts."""
    port = free_port()
    procs.spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(work)])
    wait(lambda: accepts(port), what="redis")
    return port


def nginx_app_cmd(work: Path) -> list[str]:
    """A FalFunction command running nginx `return 200` (NGINX_TMPL) as the app on the
    $PORT its replica is given."""
    d = work / "nginx"
    d.mkdir(exist_ok=True)
    (d / "tmpl.conf").write_text(NGINX_TMPL.format(dir=d))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return ["sh", "-c", f'sed "s/@PORT@/$PORT/g" {d}/tmpl.conf > {d}/$PORT.conf && '
                        f'exec {nginx} -p {d} -c {d}/$PORT.conf -g "daemon off;"']


def median3(runs):
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--operator", required=True)
    ap.add_argument("--sidecar", required=True)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "3")))
    ap.add_argument("--cold-rounds", type=int, default=15)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--functions", type=int, default=1000)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fal-bench-gw."))
    procs = Procs()
    spawn = procs.spawn

    def cleanup():
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)

    try:
        redis_port = start_redis(procs, work)
        wrapper = work / "arrival_app.py"
        wrapper.write_text(WRAPPER)
        nginx_cmd = nginx_app_cmd(work)
        app_cmd = [sys.executable, str(wrapper), str(REPO / "examples" / "app.py")]

        def ff(name, cmd, **spec):
            body = {"image": "bench:1", "command": cmd, "keepAlive": 0, "minReplicas": 0,
                    "maxReplicas": 1, "maxConcurrency": 1}
            body.update(spec)
            return {"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
                    "metadata": {"name": name, "namespace": "bench"}, "spec": body}

        manifest = work / "functions.yaml"
        manifest.write_text("\n---\n".join(json.dumps(d) for d in [
            ff("cold", app_cmd),
            ff("fast", nginx_cmd, minReplicas=1, maxConcurrency=1024, keepAlive=3600),
        ]))
        run_p, queue_p, admin_p = free_port(), free_port(), free_port()
        env = {**os.environ, "FAL_SIDECAR_MAX_QUEUE": "10000000", "RUST_LOG": "warn"}
        spawn([a.operator, "local", "-f", str(manifest), "--store", f"redis://127.0.0.1:{redis_port}/0",
               "--listen", f"127.0.0.1:{run_p}", "--queue-listen", f"127.0.0.1:{queue_p}",
               "--admin-listen", f"127.0.0.1:{admin_p}", "--sidecar-bin", a.sidecar,
               "--state-dir", str(work / "state"), "--max-queue", "10000000"], env=env, cwd=str(REPO))
        admin = f"http://127.0.0.1:{admin_p}"
        wait(lambda: accepts(admin_p), what="fal-operator local")

        def fn(key):
            return {f["function"]: f for f in get_json(f"{admin}/functions")}[key]

        # -- 1. baseline: spawn the app → its port accepts ---------------------------
        spawn_ms = []
        for _ in range(a.cold_rounds):
            port = free_port()
            t0 = time.monotonic()
            p = subprocess.Popen(app_cmd, env={**os.environ, "PORT": str(port)},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait(lambda: accepts(port), interval=0.0005, what="the app")
            spawn_ms.append((time.monotonic() - t0) * 1000)
            p.terminate()
            p.wait()

        # -- 1+2. cold starts through the gateway, wake latency ------------------------
        cold_ms, wake_ms = [], []
        for i in range(a.cold_rounds):
            wait(lambda: not fn("bench/cold")["local"]["replicas"], timeout=60, interval=0.01,
                 what="scale to zero")
            time.sleep(0.2)
            if i % 2 == 0:
                t0 = time.time()
                status, headers, _ = post(f"http://127.0.0.1:{run_p}/bench/cold/test")
                assert status == 200
                cold_ms.append((float(headers["x-arrived"]) - t0) * 1000)
            else:
                t0 = time.time()
                status, _, body = post(f"http://127.0.0.1:{queue_p}/bench/cold/test")
                assert status == 200
                reps = wait(lambda: fn("bench/cold")["local"]["replicas"], interval=0.001,
                            what="a replica")
                wake_ms.append(reps[0]["started_unix_ms"] - t0 * 1000)
                rid = json.loads(body)["request_id"]
                wait(lambda: get_json(f"http://127.0.0.1:{queue_p}/bench/cold/requests/{rid}/status")["status"]
                     == "COMPLETED", timeout=60, interval=0.01, what="the request")

        # -- 3. warm sync calls: gateway vs the replica's sidecar ------------------------
        rep = wait(lambda: [r for r in fn("bench/fast")["local"]["replicas"] if r["phase"] == "ready"],
                   timeout=60, what="the fast replica")[0]
        side_url = f"http://{rep['run']}/"
        gw_url = f"http://127.0.0.1:{run_p}/bench/fast/"
        wrk(side_url, 2, a.conns)
        wrk(gw_url, 2, a.conns)
        side, gw = [], []
        for _ in range(a.rounds):
            side.append(wrk(side_url, a.duration, a.conns))
            gw.append(wrk(gw_url, a.duration, a.conns))
        side, gw = median3(side), median3(gw)
        # One connection: the latency a single caller sees, not CPU contention.
        side1 = median3([wrk(side_url, a.duration, 1) for _ in range(a.rounds)])
        gw1 = median3([wrk(gw_url, a.duration, 1) for _ in range(a.rounds)])

        # -- 4. queue submits: gateway vs a sidecar serving the same queue -----------------
        # An API-only sidecar (--max-concurrency 0, its default threads) on the same Redis
        # and function: the replica keeps running the submitted requests for both.
        sq, sr, sa = free_port(), free_port(), free_port()
        spawn([a.sidecar, "serve", "--upstream", "http://127.0.0.1:9", "--store",
               f"redis://127.0.0.1:{redis_port}/0", "--function", "bench/fast", "--max-concurrency", "0",
               "--listen", f"127.0.0.1:{sr}", "--queue-listen", f"127.0.0.1:{sq}",
               "--admin-listen", f"127.0.0.1:{sa}", "--data-dir", str(work / "api-sidecar"),
               "--max-queue", "10000000"], env=env)
        wait(lambda: accepts(sq), what="the API-only sidecar")
        lua = work / "post.lua"
        lua.write_text('wrk.method = "POST"\nwrk.body = \'{"prompt": "a cat"}\'\n'
                       'wrk.headers["Content-Type"] = "application/json"\n')
        sub_side, sub_gw = [], []
        for _ in range(a.rounds):
            sub_side.append(wrk(f"http://127.0.0.1:{sq}/bench/fast/x", a.duration, a.conns, str(lua)))
            sub_gw.append(wrk(f"http://127.0.0.1:{queue_p}/bench/fast/x", a.duration, a.conns, str(lua)))
        sub_side, sub_gw = median3(sub_side), median3(sub_gw)

        # -- 5. RSS with many known functions --------------------------------------------
        many = work / "many.yaml"
        many.write_text("\n---\n".join(json.dumps(ff(f"f{i}", app_cmd, keepAlive=300)) for i in range(a.functions)))
        r2, q2, a2 = free_port(), free_port(), free_port()
        big = spawn([a.operator, "local", "-f", str(many), "--store", f"redis://127.0.0.1:{redis_port}/1",
                     "--listen", f"127.0.0.1:{r2}", "--queue-listen", f"127.0.0.1:{q2}",
                     "--admin-listen", f"127.0.0.1:{a2}", "--sidecar-bin", a.sidecar,
                     "--state-dir", str(work / "state2")], env=env, cwd=str(REPO))
        wait(lambda: accepts(a2), what="the 1,000-function local")
        assert len(get_json(f"http://127.0.0.1:{a2}/functions")) == a.functions
        time.sleep(5)
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{big.pid}/status").read_text()).group(1))
        cpu = Path(f"/proc/{big.pid}/stat").read_text().split(") ")[1].split()
        ticks = int(cpu[11]) + int(cpu[12])
        time.sleep(5)
        cpu2 = Path(f"/proc/{big.pid}/stat").read_text().split(") ")[1].split()
        idle_cpu = (int(cpu2[11]) + int(cpu2[12]) - ticks) / os.sysconf("SC_CLK_TCK") / 5 * 100

        sp50, cp50, wp50 = pct(spawn_ms, 50), pct(cold_ms, 50), pct(wake_ms, 50)
        print(f"""
## Scale to zero (fal-operator local; {os.cpu_count()} cores shared by load and servers)

| measure | p50 | p90 | n |
|---|---|---|---|
| baseline: spawn the app → its port accepts | {sp50:.1f} ms | {pct(spawn_ms, 90):.1f} ms | {len(spawn_ms)} |
| sync call at zero → the app receives it | {cp50:.1f} ms | {pct(cold_ms, 90):.1f} ms | {len(cold_ms)} |
| **cold-start overhead** (difference of p50s) | **{cp50 - sp50:.1f} ms** | | target ≤ 50 ms |
| **wake**: submit at zero → scale decision (replica spawned) | **{wp50:.2f} ms** | {pct(wake_ms, 90):.2f} ms | {len(wake_ms)}, target ≤ 5 ms |

| warm sync calls (wrk -t1 -c{a.conns} -d{a.duration}s, median of {a.rounds}) | req/s | p50 | p99 |
|---|---|---|---|
| straight to the replica's fal-sidecar | {side[0]:.0f} | {side[1]:.3f} ms | {side[2]:.3f} ms |
| through the gateway | {gw[0]:.0f} | {gw[1]:.3f} ms | {gw[2]:.3f} ms |

| one connection (-c1): straight to the sidecar | {side1[0]:.0f} | {side1[1]:.3f} ms | {side1[2]:.3f} ms |
| one connection (-c1): through the gateway | {gw1[0]:.0f} | {gw1[1]:.3f} ms | {gw1[2]:.3f} ms |

gateway/sidecar throughput: {gw[0] / side[0]:.2f}   (target ≥ 0.80)
gateway added p50:          {gw[1] - side[1]:.3f} ms at {a.conns} connections, {gw1[1] - side1[1]:.3f} ms at 1   (target ≤ 0.3 ms)

| queue submits (POST, JSON body) | req/s | p50 | p99 |
|---|---|---|---|
| through a fal-sidecar (API only) on the same Redis | {sub_side[0]:.0f} | {sub_side[1]:.3f} ms | {sub_side[2]:.3f} ms |
| through the gateway | {sub_gw[0]:.0f} | {sub_gw[1]:.3f} ms | {sub_gw[2]:.3f} ms |

gateway/sidecar submits: {sub_gw[0] / sub_side[0]:.2f}   (target ≥ 0.90)

idle `fal-operator local` knowing {a.functions} functions: RSS {rss_kb / 1024:.1f} MB (target ≤ 20 MB), CPU {idle_cpu:.1f} %
""")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
