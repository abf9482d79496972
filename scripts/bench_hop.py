#!/usr/bin/env python3
"""The gateway hop against nginx in the same position (issue 20, part 2).

Three paths to one warm replica of `fal-operator local` (its fal-sidecar in front of
nginx `return 200` as the app), measured in alternating rounds of one run:

  direct:  wrk → fal-sidecar → app
  nginx:   wrk → nginx reverse proxy (keep-alive upstream pool) → fal-sidecar → app
  gateway: wrk → fal-operator local's gateway → fal-sidecar → app

For each: requests/s, p50, p99 (wrk), and the CPU seconds the hop's process spent
(utime + stime from /proc, every thread; nginx: master and workers; the gateway: the
whole `local` process, autoscaler included) divided by the requests it served, and
how much of it was user space and how much the kernel. A second table gives what each
path costs the rest of the machine: the replica's (sidecar and app) CPU per request;
per request, the hop's sleeps (voluntary context switches), the sleeps and preemptions
of the replica's sidecar and of its app, and wrk's context switches.

--pin gives the hop a core of its own, the way it runs on a cluster: the hop (nginx or
`local`) is started on CPU 1, wrk, the replica's sidecar and the app on CPU 0. Each
process is started on its CPU (they size their thread pools from it), except the
replica and its app, which `local` spawns: they are moved to CPU 0 at once, with one
HTTP thread (FAL_SIDECAR_WORKER_THREADS=1, as a one-core start would give them).
Without --pin every process shares both cores.

--key declares a FalKey beside the function, so the gateway requires a key, and sends
`Authorization: Key …` on every path: the gateway checks it (and drops it) per request;
nginx and the replica pass it along.

Usage: scripts/bench_hop.py --operator target/release/fal-operator
           --sidecar target/release/fal-sidecar [--pin] [--json out.json] [--png out.png]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import (Procs, accepts, free_port, get_json, nginx_app_cmd, start_redis, switches,  # noqa: E402
                           wait, wrk)

REPO = Path(__file__).resolve().parents[1]

PROXY_TMPL = """worker_processes {workers};
error_log {dir}/proxy-error.log warn;
pid {dir}/proxy.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  upstream sidecar {{ server {upstream}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://sidecar;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, kernel) CPU seconds of `pids`, every thread."""
    user = kernel = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except FileNotFoundError:
            continue
        user += int(f[11])
        kernel += int(f[12])
    tck = os.sysconf("SC_CLK_TCK")
    return user / tck, kernel / tck


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == pid:
            out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def pin_tree(pids: list[int], cpu: int) -> None:
    for pid in pids:
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(t.name), {cpu})
            except (ProcessLookupError, PermissionError):
                pass


def spawn_on(procs: Procs, cpu: int | None, cmd, **kw):
    """Starts `cmd` with its affinity set before exec (it sizes itself from it)."""
    if cpu is None:
        return procs.spawn(cmd, **kw)
    return procs.spawn(cmd, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}), **kw)


def measure(url: str, duration: int, conns: int, pids, cpu: int | None, headers: tuple[str, ...] = (),
            sidecar: list[int] | None = None, app: list[int] | None = None):
    sidecar, app = sidecar or [], app or []
    replica = sidecar + app
    before = cpu_seconds(pids)
    sw_before = (switches(pids), switches(sidecar), switches(app), resource.getrusage(resource.RUSAGE_CHILDREN))
    rep_before = cpu_seconds(replica)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # wrk inherits it
    try:
        rps, p50, p99 = wrk(url, duration, conns, headers=headers)
    finally:
        if cpu is not None:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    after = cpu_seconds(pids)
    rep_after = cpu_seconds(replica)
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = rps * duration
    per_req = [(a - b) / n * 1e6 if pids else None for a, b in zip(after, before)]
    w0 = sw_before[3]
    sc, ap = switches(sidecar), switches(app)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99,
            "cpu_us_per_req": per_req[0] + per_req[1] if pids else None,
            "user_us_per_req": per_req[0], "kernel_us_per_req": per_req[1],
            # What the hop costs the rest of the machine: the replica's CPU and the
            # sleeps and preemptions of the hop, the replica (sidecar and app) and wrk.
            "replica_cpu_us_per_req": (sum(rep_after) - sum(rep_before)) / n * 1e6,
            "hop_sleeps_per_req": (switches(pids)[0] - sw_before[0][0]) / n if pids else None,
            "sidecar_sleeps_per_req": (sc[0] - sw_before[1][0]) / n,
            "sidecar_preemptions_per_req": (sc[1] - sw_before[1][1]) / n,
            "app_sleeps_per_req": (ap[0] - sw_before[2][0]) / n,
            "app_preemptions_per_req": (ap[1] - sw_before[2][1]) / n,
            "wrk_switches_per_req": (wrk_after.ru_nvcsw + wrk_after.ru_nivcsw - w0.ru_nvcsw - w0.ru_nivcsw) / n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--operator", required=True)
    ap.add_argument("--sidecar", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--key", action="store_true", help="keys on: every call carries a key the gateway checks")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--png", help="draw the comparison here (scripts/benchplot.py)")
    a = ap.parse_args()
    if a.pin and (os.cpu_count() or 1) < 2:
        raise SystemExit("--pin needs 2 CPUs")
    hop_cpu, load_cpu = (1, 0) if a.pin else (None, None)

    work = Path(tempfile.mkdtemp(prefix="fal-bench-hop."))
    procs = Procs()
    try:
        redis_port = start_redis(procs, work)
        app_cmd = nginx_app_cmd(work)
        fn = {"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
              "metadata": {"name": "fast", "namespace": "bench"},
              "spec": {"image": "bench:1", "command": app_cmd, "keepAlive": 3600, "minReplicas": 1,
                       "maxReplicas": 1, "maxConcurrency": 1024}}
        manifest = work / "functions.yaml"
        docs, headers = [fn], ()
        if a.key:
            import hashlib
            import uuid
            key_id, secret = str(uuid.uuid4()), uuid.uuid4().hex * 2
            docs.append({"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalKey",
                         "metadata": {"name": "bench", "namespace": "bench"},
                         "spec": {"keyId": key_id, "secretSha256": hashlib.sha256(secret.encode()).hexdigest()}})
            headers = (f"Authorization: Key {key_id}:{secret}",)
        manifest.write_text("\n---\n".join(json.dumps(d) for d in docs))
        run_p, queue_p, admin_p = free_port(), free_port(), free_port()
        env = {**os.environ, "RUST_LOG": "warn"}
        if a.pin:
            env["FAL_SIDECAR_WORKER_THREADS"] = "1"
        local = spawn_on(procs, hop_cpu, [
            a.operator, "local", "-f", str(manifest), "--store", f"redis://127.0.0.1:{redis_port}/0",
            "--listen", f"127.0.0.1:{run_p}", "--queue-listen", f"127.0.0.1:{queue_p}",
            "--admin-listen", f"127.0.0.1:{admin_p}", "--sidecar-bin", a.sidecar,
            "--state-dir", str(work / "state")], env=env, cwd=str(REPO))
        admin = f"http://127.0.0.1:{admin_p}"
        wait(lambda: accepts(admin_p), what="fal-operator local")
        rep = wait(lambda: [r for r in {f["function"]: f for f in get_json(f"{admin}/functions")}
                            ["bench/fast"]["local"]["replicas"] if r["phase"] == "ready"],
                   timeout=60, what="the replica")[0]
        replica_pids = descendants(local.pid)
        sidecar_pids = [p for p in replica_pids if Path(f"/proc/{p}/comm").read_text().strip() == "fal-sidecar"]
        app_pids = [p for p in replica_pids if p not in sidecar_pids]
        if a.pin:
            pin_tree(replica_pids, load_cpu)
        side_addr = rep["run"]

        proxy_dir = work / "proxy"
        proxy_dir.mkdir()
        proxy_p = free_port()
        (proxy_dir / "proxy.conf").write_text(PROXY_TMPL.format(
            workers=1 if a.pin else "auto", dir=proxy_dir, upstream=side_addr, port=proxy_p))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        proxy = spawn_on(procs, hop_cpu, [nginx, "-p", str(proxy_dir), "-c", str(proxy_dir / "proxy.conf"),
                                          "-g", "daemon off;"])
        wait(lambda: accepts(proxy_p), what="the nginx proxy")
        time.sleep(0.3)
        proxy_pids = [proxy.pid, *descendants(proxy.pid)]

        paths = {
            "direct": (f"http://{side_addr}/", []),
            "nginx": (f"http://127.0.0.1:{proxy_p}/", proxy_pids),
            "gateway": (f"http://127.0.0.1:{run_p}/bench/fast/", [local.pid]),
        }
        for url, _ in paths.values():  # warm every pool
            wrk(url, 1, a.conns, headers=headers)
        runs: dict[str, list[dict]] = {k: [] for k in paths}
        # Each round starts with another path (over 3 rounds every path runs once
        # first, once second, once last), so no path always follows the same one.
        order = list(paths)
        for r in range(a.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                url, pids = paths[name]
                runs[name].append(measure(url, a.duration, a.conns, pids, load_cpu, headers, sidecar_pids,
                                          app_pids))

        def med(name, key):
            vals = [r[key] for r in runs[name] if r[key] is not None]
            return statistics.median(vals) if vals else None

        res = {k: {m: med(k, m) for m in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "user_us_per_req",
                                          "kernel_us_per_req", "replica_cpu_us_per_req", "hop_sleeps_per_req",
                                          "sidecar_sleeps_per_req", "sidecar_preemptions_per_req",
                                          "app_sleeps_per_req", "app_preemptions_per_req",
                                          "wrk_switches_per_req")} for k in paths}
        res["pinned"] = a.pin
        res["keyed"] = a.key
        res["conns"] = a.conns
        mode = "hop on CPU 1; wrk, sidecar and app on CPU 0" if a.pin else f"{os.cpu_count()} cores shared"
        if a.key:
            mode += "; every call with a key"
        print(f"\n## Gateway hop vs nginx in the same position ({mode}; wrk -t1 -c{a.conns} "
              f"-d{a.duration}s, median of {a.rounds})\n")
        print("| path | req/s | p50 ms | p99 ms | hop CPU µs / request | of it user / kernel |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, label in [("direct", "wrk → sidecar → app"), ("nginx", "wrk → **nginx** → sidecar → app"),
                            ("gateway", "wrk → **gateway** → sidecar → app")]:
            r = res[name]
            has = r["cpu_us_per_req"] is not None
            cpu = f"{r['cpu_us_per_req']:.1f}" if has else "—"
            split = f"{r['user_us_per_req']:.1f} / {r['kernel_us_per_req']:.1f}" if has else "—"
            print(f"| {label} | {r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {cpu} | {split} |")
        print("\n| path | replica (sidecar + app) CPU µs / request | per request: hop sleeps | sidecar sleeps / "
              "preemptions | app sleeps / preemptions | wrk switches |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in paths:
            r = res[name]
            hop = f"{r['hop_sleeps_per_req']:.2f}" if r["hop_sleeps_per_req"] is not None else "—"
            print(f"| {name} | {r['replica_cpu_us_per_req']:.1f} | {hop} | {r['sidecar_sleeps_per_req']:.2f} / "
                  f"{r['sidecar_preemptions_per_req']:.2f} | {r['app_sleeps_per_req']:.2f} / "
                  f"{r['app_preemptions_per_req']:.2f} | {r['wrk_switches_per_req']:.2f} |")
        g, n, d = res["gateway"], res["nginx"], res["direct"]
        res["ratios"] = {
            "gateway_cpu_vs_nginx": g["cpu_us_per_req"] / n["cpu_us_per_req"],
            "gateway_rps_vs_direct": g["rps"] / d["rps"],
            "nginx_rps_vs_direct": n["rps"] / d["rps"],
            "gateway_rps_vs_nginx": g["rps"] / n["rps"],
        }
        rt = res["ratios"]
        print(f"\ngateway CPU per request / nginx's:  {rt['gateway_cpu_vs_nginx']:.2f}   (target ≤ 1.0)")
        print(f"  user space / nginx's:             {g['user_us_per_req'] / n['user_us_per_req']:.2f}")
        print(f"  kernel / nginx's:                 {g['kernel_us_per_req'] / n['kernel_us_per_req']:.2f}")
        print(f"gateway throughput / direct:        {rt['gateway_rps_vs_direct']:.2f}   "
              f"(target ≥ 0.8 with the gateway on its own core)")
        print(f"nginx throughput / direct:          {rt['nginx_rps_vs_direct']:.2f}")
        print(f"gateway throughput / nginx's:       {rt['gateway_rps_vs_nginx']:.2f}")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        if a.png:
            from benchplot import plot
            plot(a.png, f"Gateway hop vs nginx ({'pinned' if a.pin else 'shared cores'}, {a.conns} conns)",
                 [("direct", d), ("nginx hop", n), ("gateway hop", g)], baseline="direct",
                 extra=("hop CPU µs / request", {"nginx hop": n["cpu_us_per_req"],
                                                  "gateway hop": g["cpu_us_per_req"]}))
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
