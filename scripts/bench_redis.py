#!/usr/bin/env python3
"""Redis-backend benchmarks (issue 4), every baseline in the same run:

1. raw submit rate: redis-benchmark running the sidecar's own submit Lua script
   (sidecar/src/store/redis/lua/) vs HTTP submits through a sidecar
   (`--max-concurrency 0`, so no worker competes) measured with wrk;
2. submit → app receives: sequential submits to a sidecar whose idle worker (another
   replica) waits on Redis pub/sub; an app in a process of its own notes when each
   request's first bytes reach it, and an app on Python's http.server when its handler
   starts (alternating rounds);
3. status latency at queue depths 1k, 10k, 100k, 1M (queue filled by redis-benchmark,
   status of the last request measured with wrk);
4. Redis memory per queued request.

Usage: scripts/bench_redis.py SIDECAR_BIN [--max-depth N]
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FUNCTION = "bench/app"
PREFIX = "fal:{%s}:" % FUNCTION


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lua(name: str) -> str:
    """The store's script `name` (SUBMIT, ...) as the sidecar sends it: the prelude first."""
    scripts = REPO / "sidecar/src/store/redis/lua"
    return (scripts / "prelude.lua").read_text() + (scripts / f"{name.lower()}.lua").read_text()


# wrk's script for HTTP submits (the same small JSON body as the raw rounds).
SUBMIT_WRK = ('wrk.method = "POST"\nwrk.body = \'{"prompt": "a cat"}\'\n'
              'wrk.headers["Content-Type"] = "application/json"\n')


def raw_submits(port: int, n: int, ids: str, body: str = '{"prompt": "a cat"}') -> float:
    """redis-benchmark -c64 running the sidecar's submit script `n` times straight into
    the Redis at `port` (ids `ids` + a random number); submits per second."""
    sha = cli(port, "SCRIPT", "LOAD", lua("SUBMIT"))
    now = str(int(time.time() * 1000))
    spec = json.dumps({"id": "x", "owner": "bench", "endpoint": "/", "method": "POST",
                       "headers": [["content-type", "application/json"]], "priority": "normal",
                       "submitted_at_ms": int(now)})
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-c", "64", "-n", str(n), "-r", "2000000000", "-q",
         "EVALSHA", sha, "0", PREFIX, f"{ids}__rand_int__", spec, body, "0", "",
         "1000000000", now, "", "bench", now, "", ""],
        check=True, capture_output=True, text=True).stdout
    return float(re.findall(r"([\d.]+) requests per second", out)[-1])


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], check=True, capture_output=True, text=True).stdout.strip()


def start_redis(work: Path, name: str, *extra: str) -> tuple[int, subprocess.Popen]:
    """A redis-server (AOF everysec) on a free port with its own dir under `work`."""
    port = free_port()
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                          "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            if cli(port, "PING") == "PONG":
                return port, p
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"redis-server {name} did not start")


def empty_and_compact(port: int) -> None:
    """FLUSHALL, then an AOF rewrite that finishes before the next round starts. With
    `auto-aof-rewrite-percentage 0` no rewrite lands inside a round: ~150,000 submits
    append ~70 MB, and a rewrite (a fork and a full write) in the middle of a round cut
    its rate by a third, in whichever round crossed the size."""
    cli(port, "FLUSHALL")
    compact(port)


def compact(port: int) -> None:
    """An AOF rewrite, waited for (a replica's too: it keeps an append-only file of its own)."""
    cli(port, "BGREWRITEAOF")
    for _ in range(600):
        info = cli(port, "INFO", "persistence")
        if "aof_rewrite_in_progress:0" in info and "aof_rewrite_scheduled:0" in info:
            return
        time.sleep(0.05)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_http(url: str, timeout: float = 20) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def wrk(url: str, seconds: int, conns: int, script: str | None = None) -> tuple[float, float, float]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", url]
    if script:
        cmd[1:1] = ["-s", script]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    def pct(p):
        m = re.search(r"^\s+%d%%\s+([\d.]+)(us|ms|s)\s*$" % p, out, re.M)
        return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, pct(50), pct(99)


class StartRecorder(http.server.BaseHTTPRequestHandler):
    """An app on Python's http.server: notes when its handler starts (after http.server
    has read and parsed the request head: app time, not ours)."""
    protocol_version = "HTTP/1.1"
    # One write per response and no Nagle: otherwise the response body waits ~40 ms for
    # a delayed ACK and the next request queues behind it.
    wbufsize = -1
    disable_nagle_algorithm = True
    arrivals: "queue.Queue[tuple[str, int]]" = queue.Queue()

    def do_POST(self):
        t = time.perf_counter_ns()
        rid = self.headers.get("x-fal-request-id", "")
        self.rfile.read(int(self.headers.get("content-length") or 0))
        StartRecorder.arrivals.put((rid, t))
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


# An app in a process of its own that notes when the first bytes of each request reach
# it (the `recv` that returns them: "the app receives"), answers 200 and prints
# "REQUEST_ID MONOTONIC_NS" (time.perf_counter_ns is CLOCK_MONOTONIC, one clock for
# every process of the machine).
ARRIVAL_RECORDER = r"""
import socket, sys, threading, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
lock = threading.Lock()
OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}'

def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, first = b"", 0
    while True:
        d = c.recv(65536)
        t = time.perf_counter_ns()
        if not d:
            return
        if not buf:
            first = t
        buf += d
        while b"\r\n\r\n" in buf:
            head, rest = buf.split(b"\r\n\r\n", 1)
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                fields[k.strip().lower()] = v.strip()
            n = int(fields.get(b"content-length", b"0"))
            while len(rest) < n:
                rest += c.recv(65536)
            buf = rest[n:]
            c.sendall(OK)
            with lock:
                sys.stdout.write(f"{fields.get(b'x-fal-request-id', b'').decode()} {first}\n")
                sys.stdout.flush()
            first = t if buf else 0

while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def start_latency(api_run: str, arrival, n: int) -> list[float]:
    """Sequential submits to `api_run` (its replica runs nothing) while an idle worker of
    another replica waits on Redis pub/sub; `arrival(request_id)` blocks until the app
    has the request and gives its CLOCK_MONOTONIC ns. Milliseconds, one per submit.

    A raw keep-alive socket with TCP_NODELAY, one write per request, so the client adds
    no Nagle/delayed-ACK stalls of its own."""
    host, port = api_run.rsplit(":", 1)
    sock = socket.create_connection(("127.0.0.1", int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    lat = []
    try:
        for i in range(n):
            body = json.dumps({"i": i}).encode()
            t0 = time.perf_counter_ns()
            sock.sendall(b"POST /fal/queue/submit/ HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            rid = json.loads(reader.read(length))["request_id"]
            lat.append((arrival(rid) - t0) / 1e6)
            time.sleep(0.002)  # the worker is idle again, waiting on pub/sub
    finally:
        sock.close()
    return lat


def pcts(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return statistics.median(lat), lat[max(0, int(len(lat) * 0.99) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sidecar")
    ap.add_argument("--max-depth", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=int, default=6, help="length of one HTTP round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each path (medians)")
    ap.add_argument("--raw-submits", type=int, default=150_000, help="submits in one redis-benchmark round")
    ap.add_argument("--png", help="draw the submit comparison here (scripts/benchplot.py)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fal-bench-redis."))
    procs: list[subprocess.Popen] = []
    try:
        rport = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--dir", str(work), "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec"], stdout=subprocess.DEVNULL))
        for _ in range(100):
            try:
                if cli(rport, "PING") == "PONG":
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        store = f"redis://127.0.0.1:{rport}/0"

        # --- the app for the latency test --------------------------------------------
        app_port = free_port()
        app = http.server.ThreadingHTTPServer(("127.0.0.1", app_port), StartRecorder)
        threading.Thread(target=app.serve_forever, daemon=True).start()

        def sidecar(name: str, workers: int, upstream: int = app_port) -> tuple[str, str]:
            l, q, a = free_port(), free_port(), free_port()
            env = dict(os.environ, FAL_SIDECAR_LOG="warn")
            procs.append(subprocess.Popen(
                [args.sidecar, "serve", "--upstream", f"http://127.0.0.1:{upstream}", "--store", store,
                 "--function", FUNCTION, "--listen", f"127.0.0.1:{l}", "--queue-listen", f"127.0.0.1:{q}",
                 "--admin-listen", f"127.0.0.1:{a}", "--data-dir", str(work / name),
                 "--max-concurrency", str(workers), "--max-queue", "100000000"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "w")))
            wait_http(f"http://127.0.0.1:{a}/readyz")
            return f"http://127.0.0.1:{l}", f"http://127.0.0.1:{q}"

        # --- 1. raw script rate vs HTTP submits --------------------------------------------
        api_run, api_queue = sidecar("api", 0)
        lua_body = work / "submit.lua"
        lua_body.write_text(SUBMIT_WRK)

        # Alternating rounds, medians: the machine's CPU is shared (and on a VM, stolen),
        # so one round of each path says little. Every round starts from an empty queue
        # and a compacted AOF (`empty_and_compact`).
        cli(rport, "CONFIG", "SET", "auto-aof-rewrite-percentage", "0")
        raws, https = [], []
        for _ in range(args.rounds):
            empty_and_compact(rport)
            raws.append(raw_submits(rport, args.raw_submits, "raw-"))
            empty_and_compact(rport)
            https.append(wrk(f"{api_run}/fal/queue/submit/", args.seconds, 64, str(lua_body)))
        cli(rport, "CONFIG", "SET", "auto-aof-rewrite-percentage", "100")
        raw_rps = statistics.median(raws)
        http_rps = statistics.median(r[0] for r in https)
        http_p50 = statistics.median(r[1] for r in https)
        http_p99 = statistics.median(r[2] for r in https)
        ratios = sorted(h[0] / r for h, r in zip(https, raws))

        # --- 4. memory per queued request (from the HTTP submits just made) -------------------
        queued = int(cli(rport, "ZCARD", PREFIX + "queue"))
        cli(rport, "DEL", PREFIX + "queue")
        # keys of those jobs still exist: measure by flushing and refilling a known count
        cli(rport, "FLUSHALL")
        base_mem = int(re.search(r"used_memory:(\d+)", cli(rport, "INFO", "memory")).group(1))
        import httpx  # the test venv has it
        with httpx.Client() as c:
            for i in range(5000):
                c.post(f"{api_run}/fal/queue/submit/", content=b'{"prompt": "a cat"}',
                       headers={"content-type": "application/json"})
        mem = int(re.search(r"used_memory:(\d+)", cli(rport, "INFO", "memory")).group(1))
        per_request = (mem - base_mem) / 5000
        cli(rport, "FLUSHALL")

        # --- 2. submit → app start -----------------------------------------------------
        # Two apps, alternating rounds: one that notes when the request's first bytes
        # reach it (the target's "app receives"), and one on Python's http.server that
        # notes when its handler starts (after its own header parsing, ~0.2 ms here).
        recorder = subprocess.Popen([sys.executable, "-c", ARRIVAL_RECORDER], stdout=subprocess.PIPE, text=True)
        procs.append(recorder)
        recorder_port = int(recorder.stdout.readline())

        def arrived_at_socket(rid: str) -> int:
            got, t = recorder.stdout.readline().split()
            assert got == rid, f"the recorder saw {got!r}, expected {rid!r}"
            return int(t)

        def arrived_in_handler(rid: str) -> int:
            got, t = StartRecorder.arrivals.get(timeout=5)
            assert got == rid, f"the handler saw {got!r}, expected {rid!r}"
            return t

        at_socket, in_handler = [], []
        for r in range(args.rounds):
            for name, port, arrival, into in (("recv", recorder_port, arrived_at_socket, at_socket),
                                              ("handler", app_port, arrived_in_handler, in_handler)):
                sidecar(f"worker-{name}-{r}", 1, upstream=port)
                into += start_latency(api_run, arrival, 200)
                procs[-1].terminate()
                procs[-1].wait(30)
                procs.pop()
        start_p50, start_p99 = pcts(at_socket)
        handler_p50, handler_p99 = pcts(in_handler)
        cli(rport, "FLUSHALL")

        # --- 3. status latency by depth ------------------------------------------------------
        depths = [d for d in (1_000, 10_000, 100_000, 1_000_000) if d <= args.max_depth]
        status_rows = []
        filled = 0
        for depth in depths:
            raw_submits(rport, depth - filled, f"fill{depth}-", body="{}")
            filled = depth
            with httpx.Client() as c:
                url = c.post(f"{api_queue}/bench/app/echo", json={}).json()["status_url"]
                pos = c.get(url).json()["queue_position"]
            _, p50, p99 = wrk(url, 3, 8)
            status_rows.append((depth, int(cli(rport, "ZCARD", PREFIX + "queue")), pos, p50, p99))
            filled += 1

        print()
        print("| measure | value |")
        print("|---|---:|")
        print(f"| raw submit script (redis-benchmark, -c64), median of {args.rounds} | {raw_rps:,.0f} /s |")
        print(f"| HTTP submits through the sidecar (wrk -c64), median of {args.rounds} | {http_rps:,.0f} /s (p50 {http_p50:.2f} ms, p99 {http_p99:.2f} ms) |")
        print(f"| HTTP / raw | {http_rps / raw_rps:.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.85) |")
        print(f"| submit -> app receives (first bytes at the app's socket) p50 / p99 | {start_p50:.2f} ms / {start_p99:.2f} ms (target p50 < 1 ms) |")
        print(f"| submit -> app handler starts (Python http.server) p50 / p99 | {handler_p50:.2f} ms / {handler_p99:.2f} ms |")
        print(f"| Redis memory per queued request | {per_request:,.0f} bytes |")
        print()
        print("| queue depth | position of the probe | status p50 ms | status p99 ms |")
        print("|---:|---:|---:|---:|")
        for depth, card, pos, p50, p99 in status_rows:
            print(f"| {card:,} | {pos:,} | {p50:.3f} | {p99:.3f} |")
        if args.png:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from benchplot import plot
            plot(args.png, "Redis submits: HTTP through fal-sidecar vs redis-benchmark of the same script",
                 [("redis-benchmark", {"rps": raw_rps}),
                  ("HTTP via sidecar", {"rps": http_rps, "p50_ms": http_p50, "p99_ms": http_p99}),
                  ("submit→app receives", {"p50_ms": start_p50, "p99_ms": start_p99})],
                 baseline="redis-benchmark", units=("submits/s", "ms"))
        if len(status_rows) > 1:
            print(f"\nstatus p50 at {status_rows[-1][1]:,} / at {status_rows[0][1]:,}: "
                  f"{status_rows[-1][3] / status_rows[0][3]:.2f} (target <= 2)")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
