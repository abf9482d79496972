#!/usr/bin/env python3
"""Two fal-sidecar builds against each other and against nginx, in one run (issue 20).

  nginx: wrk → nginx reverse proxy (keep-alive upstream pool) → app
  A, B:  wrk → fal-sidecar serve (each build) → app

The app is nginx `return 200`. Rounds rotate the order of the three paths; medians are
reported. For each path: requests/s and the proxy's CPU per request from /proc (every
thread; nginx: master and workers), split into user space and kernel. A change to the
data path is judged by its CPU per request against the build before it: on a shared
2-core machine throughput moves by several percent from run to run, the CPU per request
much less.

Usage: scripts/bench_ab.py BUILD_A BUILD_B [--rounds 8] [--duration 5] [--conns 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import NGINX_TMPL, free_port  # noqa: E402
from bench_hop import PROXY_TMPL, children, cpu_seconds  # noqa: E402


def cpu(pid: int) -> tuple[float, float]:
    """(user, kernel) seconds of `pid` and its children (nginx's workers)."""
    return cpu_seconds([pid, *children(pid)])


def wait_listening(port: int, what: str, log: Path | None = None) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not start listening on {port}" + (f":\n{log.read_text()}" if log else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=64)
    a = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y {tool} (scripts/bench.sh installs both)")
    work = Path(tempfile.mkdtemp(prefix="fal-bench-ab."))
    procs: list[subprocess.Popen] = []

    def nginx(name: str, conf) -> subprocess.Popen:
        """nginx with the configuration `conf(its directory)`."""
        d = work / name
        d.mkdir()
        (d / "nginx.conf").write_text(conf(d))
        p = subprocess.Popen(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"])
        procs.append(p)
        return p

    try:
        threads = os.cpu_count() or 2
        app, proxy = free_port(), free_port()
        nginx("app", lambda d: NGINX_TMPL.format(dir=d).replace("@PORT@", str(app)))
        targets = {"nginx": (proxy, nginx("proxy", lambda d: PROXY_TMPL.format(
            workers=threads, dir=d, upstream=f"127.0.0.1:{app}", port=proxy)))}
        for name, binary in (("A", a.a), ("B", a.b)):
            run, queue, admin = free_port(), free_port(), free_port()
            log = work / f"{name}.log"
            p = subprocess.Popen(
                [binary, "serve", "--upstream", f"http://127.0.0.1:{app}", "--listen", f"127.0.0.1:{run}",
                 "--queue-listen", f"127.0.0.1:{queue}", "--admin-listen", f"127.0.0.1:{admin}",
                 "--data-dir", str(work / f"data-{name}"), "--max-concurrency", "64"],
                env=dict(os.environ, FAL_SIDECAR_WORKER_THREADS=str(threads)),
                stdout=subprocess.DEVNULL, stderr=log.open("w"))
            procs.append(p)
            wait_listening(run, f"build {name} ({binary})", log)
            targets[name] = (run, p)
        wait_listening(proxy, "the nginx proxy")

        def measure(port: int, proc: subprocess.Popen) -> dict:
            before = cpu(proc.pid)
            out = subprocess.run(["wrk", "-t1", f"-c{a.conns}", f"-d{a.duration}s", f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True).stdout
            after = cpu(proc.pid)
            if "Non-2xx" in out or "Socket errors" in out:
                sys.exit(f"errors on port {port}:\n{out}")
            n = int(re.search(r"(\d+) requests in", out).group(1))
            user, kernel = ((x - y) / n * 1e6 for x, y in zip(after, before))
            return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                    "user": user, "kernel": kernel, "cpu": user + kernel}

        for port, _ in targets.values():  # warm every pool
            subprocess.run(["wrk", "-t1", f"-c{a.conns}", "-d2s", f"http://127.0.0.1:{port}/"], capture_output=True)
        runs: dict[str, list[dict]] = {k: [] for k in targets}
        order = list(targets)
        for r in range(a.rounds):
            for name in order[r % 3:] + order[:r % 3]:
                runs[name].append(measure(*targets[name]))
            print(f"round {r + 1}: " + "  ".join(
                f"{k} {v[-1]['rps']:,.0f}/s {v[-1]['cpu']:.1f} µs" for k, v in runs.items()), flush=True)
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("rps", "user", "kernel", "cpu")}
               for k, v in runs.items()}
        print(f"\n| path | req/s | vs nginx | proxy CPU µs / request | user / kernel |  "
              f"(wrk -t1 -c{a.conns} -d{a.duration}s, median of {a.rounds})")
        print("|---|---:|---:|---:|---:|")
        for k, label in (("nginx", "nginx proxy"), ("A", f"A: {a.a}"), ("B", f"B: {a.b}")):
            m = med[k]
            print(f"| {label} | {m['rps']:,.0f} | {m['rps'] / med['nginx']['rps']:.3f}× | {m['cpu']:.1f} | "
                  f"{m['user']:.1f} / {m['kernel']:.1f} |")
        print(f"\nB / A CPU per request: {med['B']['cpu'] / med['A']['cpu']:.3f}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
