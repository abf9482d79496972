#!/usr/bin/env python3
"""API-key benchmarks (issue 15), each ratio against a baseline run in the same
invocation, rounds alternated (scripts/bench-auth.sh builds the release binaries):

1. warm sync calls through the gateway of `fal-operator local` (nginx as the app):
   auth off (no FalKey) vs `Authorization: Key …` on every request (target ≥ 0.95×)
   vs a key with a rate limit, counted in Redis in leased batches (target ≥ 0.90×);
   gateway CPU seconds per 10,000 requests from /proc for each;
2. RSS of `fal-operator local` with 10,000 FalKeys loaded vs none (target ≤ 10 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import REPO, Procs, accepts, free_port, get_json, nginx_app_cmd, start_redis, wait  # noqa: E402
from bench_gateway import wrk as gateway_wrk  # noqa: E402


def wrk(url: str, duration: int, conns: int, header: str | None) -> float:
    """Requests/s of one wrk run (bench_gateway's; it stops on any error answer)."""
    return gateway_wrk(url, duration, conns, headers=(header,) if header else ())[0]


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def falkey(name: str, **spec) -> tuple[dict, str]:
    key_id, secret = f"{name}-{secrets.token_hex(8)}", secrets.token_hex(32)
    return ({"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalKey",
             "metadata": {"name": name, "namespace": "bench"},
             "spec": {"keyId": key_id, "secretSha256": hashlib.sha256(secret.encode()).hexdigest(), **spec}},
            f"{key_id}:{secret}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--operator", required=True)
    ap.add_argument("--sidecar", required=True)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "5")))
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--only", choices=["throughput", "memory"], help="run one part")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fal-bench-auth."))
    procs = Procs()
    spawn = procs.spawn

    try:
        redis_port = start_redis(procs, work)
        nginx_cmd = nginx_app_cmd(work)
        fast = {"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
                "metadata": {"name": "fast", "namespace": "bench"},
                "spec": {"image": "bench:1", "command": nginx_cmd, "minReplicas": 1, "maxReplicas": 1,
                         "maxConcurrency": 1024, "keepAlive": 3600}}
        plain_doc, plain_key = falkey("plain")
        # A limit far above what one machine sends: every request is counted in Redis,
        # none is refused.
        limited_doc, limited_key = falkey("limited", rateLimit={"requestsPerSecond": 1e6, "burst": 1000000})
        env = {**os.environ, "RUST_LOG": "warn"}

        def local(name: str, docs: list[dict]) -> tuple[subprocess.Popen, int, int]:
            f = work / f"{name}.yaml"
            f.write_text("\n---\n".join(json.dumps(d) for d in docs))
            run_p, queue_p, admin_p = free_port(), free_port(), free_port()
            p = spawn([a.operator, "local", "-f", str(f), "--store", f"redis://127.0.0.1:{redis_port}/0",
                       "--listen", f"127.0.0.1:{run_p}", "--queue-listen", f"127.0.0.1:{queue_p}",
                       "--admin-listen", f"127.0.0.1:{admin_p}", "--sidecar-bin", a.sidecar,
                       "--state-dir", str(work / name)], env=env, cwd=str(REPO))
            wait(lambda: accepts(admin_p), what=f"local {name}")
            wait(lambda: get_json(f"http://127.0.0.1:{admin_p}/functions")[0]["readyReplicas"] == 1,
                 timeout=60, what=f"{name}'s replica")
            return p, run_p, admin_p

        med, cpu_med, base, base_cpu, big, none = {}, {}, 1.0, 1.0, 0.0, 0.0
        variants: dict = {}
        # -- 1. throughput, key check on and off ------------------------------------------
        # Two gateways on one Redis (each with its own nginx replica); `open` has no keys.
        open_p, open_run, _ = local("open", [fast]) if a.only != "memory" else (None, 0, 0)
        keyed_p, keyed_run, _ = local("keyed", [fast, plain_doc, limited_doc]) if a.only != "memory" else (None, 0, 0)
        variants = {} if a.only == "memory" else {
            "auth off (no FalKey)": (open_p, f"http://127.0.0.1:{open_run}/bench/fast/", None),
            "Authorization: Key on every request": (keyed_p, f"http://127.0.0.1:{keyed_run}/bench/fast/",
                                                    f"Authorization: Key {plain_key}"),
            "key with a rate limit (GCRA in Redis, leased in batches)": (
                keyed_p, f"http://127.0.0.1:{keyed_run}/bench/fast/", f"Authorization: Key {limited_key}"),
        }
        for _, url, h in variants.values():
            wrk(url, 2, a.conns, h)
        rps: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(a.rounds):
            for name, (p, url, h) in variants.items():
                c0 = cpu_seconds(p.pid)
                r = wrk(url, a.duration, a.conns, h)
                c1 = cpu_seconds(p.pid)
                rps[name].append(r)
                cpu[name].append((c1 - c0) / (r * a.duration) * 10_000)
        if variants:
            med = {k: statistics.median(v) for k, v in rps.items()}
            cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
            base = med["auth off (no FalKey)"]
            base_cpu = cpu_med["auth off (no FalKey)"]

        # -- 2. RSS with many keys -----------------------------------------------------------
        if a.only != "throughput":
            many = [fast] + [falkey(f"k{i}", functions=["fast"])[0] for i in range(a.keys)]
            big_p, _, _ = local("many", many)
            none_p, _, _ = local("none", [fast])
            time.sleep(3)
            big, none = rss_mb(big_p.pid), rss_mb(none_p.pid)

        rows = "\n".join(
            f"| {k} | {med[k]:.0f} | {med[k] / base:.2f}× | {cpu_med[k]:.2f} s | {cpu_med[k] / base_cpu:.2f}× |"
            for k in variants)
        print(f"""
## API keys (fal-operator local, nginx as the app; {os.cpu_count()} cores shared by load and servers)

| warm sync calls, wrk -t1 -c{a.conns} -d{a.duration}s, median of {a.rounds} alternated rounds | req/s | vs auth off | gateway CPU per 10k req | vs auth off |
|---|---|---|---|---|
{rows}

targets: with a key ≥ 0.95×, with a rate limit ≥ 0.90×

| RSS of fal-operator local, 1 function | MB |
|---|---|
| no FalKey | {none:.1f} |
| {a.keys:,} FalKeys | {big:.1f} |
| **difference** | **{big - none:.1f}** (target ≤ 10 MB) |
""")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
