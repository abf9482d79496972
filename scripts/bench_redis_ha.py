#!/usr/bin/env python3
"""The store past one Redis (issue 11), every baseline in the same run:

1. scale-out: aggregate submits/s across 16 functions into one Redis vs a 3-master
   Redis Cluster (each function's keys on the shard that owns its hash tag);
2. the cost of --store-replicas 1 (script + WAIT in one pipeline) on a primary with
   one replica, against the same primary without it.

Submits go straight into the store (`store_bench`, no HTTP), so the sidecars' HTTP
work does not hide the store. Rounds alternate the variants; medians are reported.
Failover times are measured by tests/e2e/test_redis_ha.py (HA-MEASURE lines).

Usage: scripts/bench_redis_ha.py [--seconds N] [--rounds N] [--concurrency N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_redis import cli, free_port, start_redis, stop_all  # noqa: E402


def server(work: Path, name: str, *extra: str):
    """A redis-server of this bench: AOF everysec, no automatic rewrite (a fork and a full
    write that landed in whichever variant's round crossed the size)."""
    return start_redis(work, name, "--auto-aof-rewrite-percentage", "0", *extra)


def cpu_seconds(port: int) -> float:
    """used_cpu_user + used_cpu_sys of one redis-server."""
    info = dict(line.split(":", 1) for line in cli(port, "INFO", "cpu").splitlines() if ":" in line)
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def bench(binary: Path, url: str, seconds: int, conc: int, functions: int, replicas: int = 0):
    out = subprocess.run([str(binary), url, str(functions), str(seconds), str(conc), str(replicas)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), int(out[3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--functions", type=int, default=16)
    ap.add_argument("--png", help="draw the comparison here (scripts/benchplot.py)")
    ap.add_argument("--store-bench", help="a built store_bench example (default: build it now)")
    args = ap.parse_args()
    if args.store_bench:
        binary = Path(args.store_bench)
    else:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "fal-sidecar", "--example", "store_bench",
                        "--locked"], check=True, cwd=REPO)
        target = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], check=True,
                                capture_output=True, text=True, cwd=REPO).stdout
        import json
        binary = Path(json.loads(target)["target_directory"]) / "release" / "examples" / "store_bench"
    work = Path(tempfile.mkdtemp(prefix="fal-bench-ha."))
    procs: list[subprocess.Popen] = []
    try:
        single, p = server(work, "single")
        procs.append(p)
        ports = []
        for i in range(3):
            # The bus port is explicit: the default (port + 10000) is past 65535 for high ports.
            port, p = server(work, f"c{i}", "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                             "--cluster-port", str(free_port()))
            ports.append(port)
            procs.append(p)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True)
        for port in ports:
            for _ in range(400):
                if "cluster_state:ok" in cli(port, "CLUSTER", "INFO"):
                    break
                time.sleep(0.05)
        primary, p = server(work, "primary")
        procs.append(p)
        replica, p = server(work, "replica", "--replicaof", "127.0.0.1", str(primary))
        procs.append(p)
        for _ in range(400):
            if "state=online" in cli(primary, "INFO", "replication"):
                break
            time.sleep(0.05)

        servers = {
            "one Redis": [single],
            "3-master cluster": ports,
            "primary+replica, --store-replicas 0": [primary],
            "primary+replica, --store-replicas 1": [primary],
        }
        variants = {
            "one Redis": (f"redis://127.0.0.1:{single}/0", 0),
            "3-master cluster": ("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports), 0),
            "primary+replica, --store-replicas 0": (f"redis://127.0.0.1:{primary}/0", 0),
            "primary+replica, --store-replicas 1": (f"redis://127.0.0.1:{primary}/0", 1),
        }
        got: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in variants}
        # Redis CPU per 1,000 submits of the busiest server of each variant: what one
        # shard must do, so the ratio single/busiest-shard is the scale-out once Redis
        # (not this machine's 2 cores) is the limit.
        busiest: dict[str, list[float]] = {k: [] for k in variants}
        for name, (url, reps) in variants.items():  # warm-up
            bench(binary, url, 1, args.concurrency, args.functions, reps)
        for _ in range(args.rounds):
            for name, (url, reps) in variants.items():
                before = [cpu_seconds(p) for p in servers[name]]
                r = bench(binary, url, args.seconds, args.concurrency, args.functions, reps)
                after = [cpu_seconds(p) for p in servers[name]]
                got[name].append(r)
                done = r[0] * args.seconds / 1000
                busiest[name].append(max(a - b for a, b in zip(after, before)) / done)
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
                   statistics.median(r[2] for r in v), sum(r[3] for r in v)) for k, v in got.items()}
        print(f"\n## Store past one Redis ({args.functions} functions, {args.concurrency} concurrent submits, "
              f"{args.seconds} s x {args.rounds} rounds, medians; {os.cpu_count()} cores shared by the "
              f"client and every redis-server)\n")
        cpu = {k: statistics.median(v) * 1000 for k, v in busiest.items()}
        print("| store | submits/s | p50 | p99 | errors | busiest redis-server CPU per 1,000 submits |")
        print("|---|---|---|---|---|---|")
        for k, (rps, p50, p99, err) in med.items():
            print(f"| {k} | {rps:,.0f} | {p50:.2f} ms | {p99:.2f} ms | {err} | {cpu[k]:.1f} ms |")
        print(f"\nscale-out, cluster / one Redis: **{med['3-master cluster'][0] / med['one Redis'][0]:.2f}x** "
              f"measured here (target >= 2); Redis work per shard: one Redis {cpu['one Redis']:.1f} ms vs the "
              f"busiest shard {cpu['3-master cluster']:.1f} ms per 1,000 submits = "
              f"**{cpu['one Redis'] / cpu['3-master cluster']:.2f}x** capacity when Redis is the bottleneck")
        r0, r1 = med["primary+replica, --store-replicas 0"], med["primary+replica, --store-replicas 1"]
        print(f"--store-replicas 1 / 0 throughput: **{r1[0] / r0[0]:.2f}x**, p50 {r0[1]:.2f} -> {r1[1]:.2f} ms")
        if args.png:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from benchplot import plot
            plot(args.png, f"Queue submits past one Redis ({args.concurrency} concurrent)",
                 [(k.replace("primary+replica, ", "").replace("--store-replicas", "replicas"),
                   {"rps": rps, "p50_ms": p50, "p99_ms": p99}) for k, (rps, p50, p99, _) in med.items()],
                 baseline="one Redis", units=("submits/s", "ms"))
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
