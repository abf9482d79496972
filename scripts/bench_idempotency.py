#!/usr/bin/env python3
"""What an Idempotency-Key costs at submit, on both stores, in one run.

For each store (embedded redb in a data dir; one redis-server with AOF everysec) one
API-only sidecar (`--max-concurrency 0`: nothing competes with the submits) takes wrk
submits without a key and with a unique key per request (every keyed submit stores a
key: the worst case; a replay stores nothing). Rounds alternate the two variants and
the median of each is reported, with the ratio keyed/plain (target >= 0.9, i.e. the key
costs <= 10 %).

Usage: scripts/bench_idempotency.py SIDECAR_BIN [--seconds N] [--rounds N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench_redis import free_port, start_redis, stop_all, wait_http, wrk

BASE = '''wrk.method = "POST"
wrk.body = '{"prompt": "a cat"}'
wrk.headers["Content-Type"] = "application/json"
local prefix = tostring(math.random(1, 2^30)) .. "-" .. tostring(os.time())
local n = 0
request = function()
  n = n + 1
  wrk.headers["%s"] = prefix .. "-" .. n
  return wrk.format()
end
'''
# Both variants build every request in Lua with a unique header of the same size, so
# wrk's own cost (it shares the 2 cores) is the same; only the header's name differs.
PLAIN = BASE % "X-Bench-Nonce-Xy"
KEYED = BASE % "Idempotency-Key"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sidecar")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fal-bench-idem."))
    procs: list[subprocess.Popen] = []
    try:
        rport, p = start_redis(work, "redis")
        procs.append(p)
        scripts = {}
        for name, body in (("plain", PLAIN), ("keyed", KEYED)):
            scripts[name] = work / f"{name}.lua"
            scripts[name].write_text(body)

        def sidecar(name: str, *store: str) -> str:
            l, q, a = free_port(), free_port(), free_port()
            procs.append(subprocess.Popen(
                [args.sidecar, "serve", "--upstream", "http://127.0.0.1:9", *store,
                 "--listen", f"127.0.0.1:{l}", "--queue-listen", f"127.0.0.1:{q}",
                 "--admin-listen", f"127.0.0.1:{a}", "--data-dir", str(work / name),
                 "--max-concurrency", "0", "--max-queue", "100000000"],
                env=dict(os.environ, FAL_SIDECAR_LOG="warn"),
                stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "w")))
            wait_http(f"http://127.0.0.1:{a}/healthz")  # no app behind it: never "ready"
            return f"http://127.0.0.1:{l}/fal/queue/submit/"

        stores = {
            "embedded": sidecar("embedded"),
            "redis": sidecar("redis", "--store", f"redis://127.0.0.1:{rport}/0", "--function", "bench/idem"),
        }
        rows = []
        for store, url in stores.items():
            wrk(url, 2, args.conns, str(scripts["plain"]))  # warm-up
            got: dict[str, list[tuple[float, float]]] = {"plain": [], "keyed": []}
            for _ in range(args.rounds):
                for variant in ("plain", "keyed"):
                    rps, p50, _ = wrk(url, args.seconds, args.conns, str(scripts[variant]))
                    got[variant].append((rps, p50))
            med = {v: (statistics.median(r for r, _ in xs), statistics.median(p for _, p in xs))
                   for v, xs in got.items()}
            rows.append((store, med["plain"], med["keyed"]))

        print(f"\n## Idempotency-Key cost at submit (wrk -c{args.conns}, {args.seconds} s x {args.rounds} rounds, "
              f"medians, {os.cpu_count()} cores shared by wrk and the servers)\n")
        print("| store | no key | unique key per submit | ratio (target >= 0.9) |")
        print("|---|---|---|---|")
        for store, (prps, pp50), (krps, kp50) in rows:
            print(f"| {store} | {prps:,.0f} /s (p50 {pp50:.2f} ms) | {krps:,.0f} /s (p50 {kp50:.2f} ms) | "
                  f"**{krps / prps:.2f}** |")
    finally:
        stop_all(procs)

if __name__ == "__main__":
    main()
