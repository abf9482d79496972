#!/usr/bin/env python3
"""The embedded store's group commit, without HTTP (issue 20, "embedded store submits,
fsync'd", against River's published 46k jobs/s, which is measured in-process too).

`store_bench embedded:DIR` submits straight into `EmbeddedStore` (one redb file per
function, as a sidecar holds), every submit acknowledged only after the fsync'd commit
that holds it. Concurrent submitters share commits, so the rate depends on how many
submits wait at once: the table gives it for several concurrencies, each the median of
--rounds alternating rounds from an empty file.

The HTTP figure (submits through `fal-sidecar serve` with wrk) is `scripts/bench.sh`'s
"queue submit" row: there the sidecar's HTTP work, wrk and the writer share 2 cores.

Usage: scripts/bench_store.py [--seconds 4] [--rounds 3] [--concurrency 1,16,64,128,256]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RIVER = 46_000  # jobs/s, River's published benchmark
TARGET = 50_000


def build() -> Path:
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "fal-sidecar", "--example", "store_bench",
                    "--locked"], check=True, cwd=REPO)
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], check=True,
                          capture_output=True, text=True, cwd=REPO).stdout
    return Path(json.loads(meta)["target_directory"]) / "release" / "examples" / "store_bench"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,16,64,128,256")
    ap.add_argument("--store-bench", help="a built store_bench example (default: build it now)")
    args = ap.parse_args()
    binary = Path(args.store_bench) if args.store_bench else build()
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[int, list[tuple[float, float, float, int]]] = {c: [] for c in levels}
    work = Path(tempfile.mkdtemp(prefix="fal-bench-store."))
    try:
        for r in range(args.rounds):
            for c in levels:
                d = work / f"r{r}-c{c}"
                out = subprocess.run([str(binary), f"embedded:{d}", "1", str(args.seconds), str(c)],
                                     check=True, capture_output=True, text=True).stdout.split()
                runs[c].append((float(out[0]), float(out[1]), float(out[2]), int(out[3])))
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"## Embedded store, fsync'd submits without HTTP (median of {args.rounds}, {args.seconds} s each)\n")
    print("| concurrent submitters | submits/s | p50 ms | p99 ms | errors | vs River 46k/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        rate = statistics.median(x[0] for x in runs[c])
        p50 = statistics.median(x[1] for x in runs[c])
        p99 = statistics.median(x[2] for x in runs[c])
        errors = sum(x[3] for x in runs[c])
        print(f"| {c} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {errors} | {rate / RIVER:.2f}× |")
    best = max(statistics.median(x[0] for x in runs[c]) for c in levels)
    print(f"\nbest: {best:,.0f} submits/s (target ≥ {TARGET:,})")


if __name__ == "__main__":
    main()
