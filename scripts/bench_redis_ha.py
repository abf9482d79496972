#!/usr/bin/env python3
"""The store past one Redis (issue 11), every baseline in the same run:

1. scale-out: aggregate submits/s across 16 functions into one Redis vs a 3-master
   Redis Cluster (each function's keys on the shard that owns its hash tag);
2. the cost of --store-replicas 1 (script + WAIT in one pipeline) on a primary with
   one replica, against the same primary without it.

Submits go straight into the store (`store_bench`, no HTTP), so the sidecars' HTTP
work does not hide the store. Rounds alternate the variants; medians are reported.
Every run starts from empty servers (FLUSHALL, the replica has applied it, and every
append-only file is rewritten small): a store that kept every earlier run's jobs slows
down as it grows, and the variant that always ran second on a server paid for it.

Each variant runs at every concurrency of `--concurrency` (default 64 and 256). With
`--store-replicas 1` a write waits for the replica's round trip, so at 64 concurrent
submits the primary idles between groups (latency bounds the throughput); the peak of
each variant over the concurrencies is its capacity, and both ratios are printed.
`--wait-bound WAIT_BOUND` (the `wait_bound` example) adds the bound: a client with no
store in between, the store's submit script in pipelines of 1-16 with and without
`WAIT 1` after them, at the same number of submits out; the best ratio over the shapes
is what grouping writes under one `WAIT` can reach on this machine.
Failover times are measured by tests/e2e/test_redis_ha.py (HA-MEASURE lines).

Usage: scripts/bench_redis_ha.py [--seconds N] [--rounds N] [--concurrency N[,N...]]
                                 [--store-bench STORE_BENCH] [--wait-bound WAIT_BOUND]
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
from bench_redis import cli, compact, empty_and_compact, free_port, start_redis, stop_all  # noqa: E402


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


def wait_bound(binary: Path, primary: int, args, concs: list[int], empty) -> None:
    """The bound: every shape (connections x pipeline) at each concurrency, WAIT 0 and
    WAIT 1 alternating over the rounds, each run on emptied servers; medians."""
    shapes = [(c, g) for c in concs for g in (1, 2, 4, 8, 16) if c % g == 0]
    got: dict[tuple[int, int, int], list[tuple[float, float, int]]] = {}
    for r in range(args.rounds):
        for c, g in shapes:
            for w in ((0, 1) if r % 2 == 0 else (1, 0)):
                empty()
                run = subprocess.run([str(binary), f"redis://127.0.0.1:{primary}/0", str(args.seconds),
                                      str(c // g), str(g), str(w)], check=True, capture_output=True, text=True)
                for why in sorted(set(run.stderr.splitlines())):
                    print(f"{c // g} x {g}, WAIT {w}: {why}", file=sys.stderr)
                out = run.stdout.split()
                got.setdefault((c, g, w), []).append((float(out[0]), float(out[1]), int(out[2])))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), sum(x[2] for x in v))
           for k, v in got.items()}
    print(f"\n## The bound: the store's submit script straight from a client, groups of G under one WAIT "
          f"({args.seconds} s x {args.rounds} rounds, medians, emptied servers)\n")
    print("| submits out | connections x G | no WAIT: submits/s, p50 | WAIT 1: submits/s, p50 | ratio | errors |")
    print("|---|---|---|---|---|---|")
    for c, g in shapes:
        a, b = med[c, g, 0], med[c, g, 1]
        print(f"| {c} | {c // g} x {g} | {a[0]:,.0f}, {a[1]:.2f} ms | {b[0]:,.0f}, {b[1]:.2f} ms | "
              f"{b[0] / a[0]:.2f}x | {a[2] + b[2]} |")
    for c in concs:
        best0 = max(med[k][0] for k in med if k[0] == c and k[2] == 0)
        best1, g1 = max((med[k][0], k[1]) for k in med if k[0] == c and k[2] == 1)
        print(f"{c} out: best with WAIT 1 ({c // g1} x {g1}) / best without: **{best1 / best0:.2f}x**")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="64,256", help="comma-separated concurrent submits")
    ap.add_argument("--functions", type=int, default=16)
    ap.add_argument("--png", help="draw the replicas comparison here, one file per concurrency "
                    "(NAME-64.png, ...; scripts/benchplot.py)")
    ap.add_argument("--store-bench", help="a built store_bench example (default: build it now)")
    ap.add_argument("--wait-bound", help="a built wait_bound example: also measure what any client could "
                    "get from the primary and its replica with WAIT 1 (see the docstring)")
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
        stores = {
            "one Redis": (f"redis://127.0.0.1:{single}/0", 0),
            "3-master cluster": ("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports), 0),
            "primary+replica, --store-replicas 0": (f"redis://127.0.0.1:{primary}/0", 0),
            "primary+replica, --store-replicas 1": (f"redis://127.0.0.1:{primary}/0", 1),
        }
        concs = [int(c) for c in str(args.concurrency).split(",")]
        variants = {(k, c): v for c in concs for k, v in stores.items()}

        def empty(name: str) -> None:
            for port in servers[name]:
                empty_and_compact(port)
            if name.startswith("primary+replica"):
                cli(primary, "WAIT", "1", "10000")  # the replica has emptied too
                compact(replica)  # and its append-only file is small again

        got: dict[tuple[str, int], list[tuple[float, float, float, int]]] = {k: [] for k in variants}
        # Redis CPU per 1,000 submits of the busiest server of each variant: what one
        # shard must do, so the ratio single/busiest-shard is the scale-out once Redis
        # (not this machine's 2 cores) is the limit.
        busiest: dict[tuple[str, int], list[float]] = {k: [] for k in variants}
        for (name, conc), (url, reps) in variants.items():  # warm-up
            bench(binary, url, 1, conc, args.functions, reps)
        for _ in range(args.rounds):
            for (name, conc), (url, reps) in variants.items():
                empty(name)
                before = [cpu_seconds(p) for p in servers[name]]
                r = bench(binary, url, args.seconds, conc, args.functions, reps)
                after = [cpu_seconds(p) for p in servers[name]]
                got[name, conc].append(r)
                done = r[0] * args.seconds / 1000
                busiest[name, conc].append(max(a - b for a, b in zip(after, before)) / done)
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
                   statistics.median(r[2] for r in v), sum(r[3] for r in v)) for k, v in got.items()}
        print(f"\n## Store past one Redis ({args.functions} functions, {args.seconds} s x {args.rounds} rounds, "
              f"medians, every run on emptied servers; {os.cpu_count()} cores shared by the client and every "
              f"redis-server)\n")
        cpu = {k: statistics.median(v) * 1000 for k, v in busiest.items()}
        print("| store | concurrent submits | submits/s | p50 | p99 | errors | busiest redis-server CPU per 1,000 "
              "submits |")
        print("|---|---|---|---|---|---|---|")
        for (k, conc), (rps, p50, p99, err) in med.items():
            print(f"| {k} | {conc} | {rps:,.0f} | {p50:.2f} ms | {p99:.2f} ms | {err} | {cpu[k, conc]:.1f} ms |")
        print()
        for c in concs:
            one, three = ("one Redis", c), ("3-master cluster", c)
            print(f"{c} concurrent: scale-out, cluster / one Redis: **{med[three][0] / med[one][0]:.2f}x** "
                  f"measured here (target >= 2); Redis work per shard: one Redis {cpu[one]:.1f} ms vs the "
                  f"busiest shard {cpu[three]:.1f} ms per 1,000 submits = "
                  f"**{cpu[one] / cpu[three]:.2f}x** capacity when Redis is the bottleneck")
        pair = ("primary+replica, --store-replicas 0", "primary+replica, --store-replicas 1")
        for c in concs:
            r0, r1 = med[pair[0], c], med[pair[1], c]
            print(f"{c} concurrent: --store-replicas 1 / 0 throughput: **{r1[0] / r0[0]:.2f}x**, "
                  f"p50 {r0[1]:.2f} -> {r1[1]:.2f} ms")
        peak = [max((med[name, c][0], c) for c in concs) for name in pair]
        print(f"peak over the concurrencies: --store-replicas 0 {peak[0][0]:,.0f}/s ({peak[0][1]} concurrent), "
              f"--store-replicas 1 {peak[1][0]:,.0f}/s ({peak[1][1]} concurrent): "
              f"**{peak[1][0] / peak[0][0]:.2f}x** (target >= 0.8)")
        if args.wait_bound:
            wait_bound(Path(args.wait_bound), primary, args, concs, lambda: empty(pair[0]))
        if args.png:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from benchplot import plot
            # The headline: the replicated store against the same primary without
            # replicas, one picture per concurrency (`--png x.png` writes x-64.png, ...).
            out = Path(args.png)
            for conc in concs:
                plot(out.with_name(f"{out.stem}-{conc}{out.suffix}"),
                     f"Submits, primary + replica, {conc} concurrent",
                     [(f"--store-replicas {reps}", {"rps": rps, "p50_ms": p50, "p99_ms": p99})
                      for reps, name in enumerate(pair) for (rps, p50, p99, _) in [med[name, conc]]],
                     baseline="--store-replicas 0", units=("submits/s", "ms"))
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
