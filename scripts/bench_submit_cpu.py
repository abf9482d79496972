#!/usr/bin/env python3
"""The sidecar's CPU per queue submit, for comparing builds (A/B) in one run.

Each round starts, for every binary in turn, a fresh store (a redis-server with AOF
everysec, or the embedded store in a new data dir) and a fresh `fal-sidecar serve`
(`--max-concurrency 0`: no worker competes), sends wrk -c64 submits to its run listener
for --seconds, and reads the sidecar's CPU (utime + stime, every thread, from /proc) over
that window: CPU µs per submit is the figure that does not depend on how busy the
machine was, req/s the one that does. With --store redis, `raw` in place of a binary
runs redis-benchmark of the submit script instead (the baseline of bench_redis.py).
Medians over --rounds alternating rounds.

Usage: scripts/bench_submit_cpu.py --store redis|embedded [--rounds 3] [--listener run|queue] BIN_OR_raw...
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_redis import FUNCTION, SUBMIT_WRK, free_port, raw_submits, start_redis

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def sidecar_round(binary: str, work: Path, store: list[str], seconds: int, conns: int,
                  listener: str = "run") -> tuple[float, float]:
    l, q, a = free_port(), free_port(), free_port()
    p = subprocess.Popen(
        [binary, "serve", "--upstream", "http://127.0.0.1:9", *store, "--listen", f"127.0.0.1:{l}",
         "--queue-listen", f"127.0.0.1:{q}", "--admin-listen", f"127.0.0.1:{a}", "--data-dir",
         str(work / "data"), "--max-concurrency", "0", "--max-queue", "100000000"],
        env=dict(os.environ, FAL_SIDECAR_LOG="warn"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a}/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.05)
        script = work / "submit.lua"
        script.write_text(SUBMIT_WRK)
        before = cpu_ticks(p.pid)
        out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", str(script),
                              f"http://127.0.0.1:{l}/fal/queue/submit/" if listener == "run"
                              else f"http://127.0.0.1:{q}/{FUNCTION}"],
                             check=True, capture_output=True, text=True).stdout
        used = (cpu_ticks(p.pid) - before) / TICK
    finally:
        p.terminate()
        p.wait(30)
    done = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, used / max(done, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", choices=["redis", "embedded"], required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--listener", choices=["run", "queue"], default="run",
                    help="submit on the run listener (/fal/queue/submit/) or the queue listener "
                         "(POST /{owner}/{app}, the fal clients' path)")
    ap.add_argument("--raw-submits", type=int, default=120_000)
    ap.add_argument("binaries", nargs="+", help="fal-sidecar builds, or `raw` (--store redis)")
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {b: [] for b in args.binaries}
    for r in range(args.rounds):
        for b in args.binaries:
            work = Path(tempfile.mkdtemp(prefix="fal-bench-submit."))
            redis = None
            try:
                store: list[str] = []
                if args.store == "redis":
                    port, redis = start_redis(work, "redis")
                    store = ["--store", f"redis://127.0.0.1:{port}/0", "--function", FUNCTION]
                if b == "raw":
                    if args.store != "redis":
                        raise SystemExit("`raw` needs --store redis")
                    results[b].append((raw_submits(port, args.raw_submits, "raw-"), 0.0))
                else:
                    results[b].append(sidecar_round(b, work, store, args.seconds, args.conns, args.listener))
                rps, us = results[b][-1]
                print(f"round {r + 1} {b}: {rps:,.0f}/s" + (f", {us:.1f} µs CPU per submit" if us else ""),
                      flush=True)
            finally:
                if redis:
                    redis.terminate()
                    redis.wait(10)
                shutil.rmtree(work, ignore_errors=True)
    print(f"\n| build | submits/s (median of {args.rounds}) | sidecar CPU µs per submit |")
    print("|---|---:|---:|")
    for b, xs in results.items():
        us = statistics.median(x[1] for x in xs)
        print(f"| {b} | {statistics.median(x[0] for x in xs):,.0f} | {f'{us:.1f}' if us else '—'} |")


if __name__ == "__main__":
    main()
