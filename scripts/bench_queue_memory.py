#!/usr/bin/env python3
"""RAM per queued request with the embedded store (issue 20, target ≤ 500 B).

Starts `fal-sidecar serve` (release build, embedded store in a fresh data directory)
in front of an upstream that is never called (no worker claims: --max-concurrency 0),
reads VmRSS, submits N requests through the queue API the way the fal clients do
(POST, ~50-byte JSON body, content-type/user-agent/accept/accept-encoding headers, no
authorization) with wrk, reads VmRSS again and prints

    (rss_after - rss_before) / queued   bytes per queued request

then restarts the sidecar on the same data directory (everything rebuilt from redb)
and prints the same figure for the restarted process (against the first idle RSS).

Usage: scripts/bench_queue_memory.py [-n 200000] [-c 64] [--bin PATH] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LUA = r"""
local n = %(n)d
local done = 0
wrk.method = "POST"
wrk.body = '{"prompt": "a photo of a cat wearing a tiny hat"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = "fal-client/0.5.9 (python)"
wrk.headers["Accept"] = "*/*"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
function response(status, headers, body)
  done = done + 1
  if status ~= 200 and status ~= 202 then
    io.stderr:write("unexpected status " .. status .. "\n")
  end
  if done >= n then wrk.thread:stop() end
end
"""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def queue_depth(admin: int) -> int:
    m = re.search(r"^fal_queue_depth (\d+)", get(f"http://127.0.0.1:{admin}/metrics"), re.M)
    if not m:
        raise RuntimeError("fal_queue_depth not in /metrics")
    return int(m.group(1))


def settle(pid: int, seconds: float = 3.0) -> int:
    """RSS once it stopped moving (the writer thread finishing, allocator settling)."""
    last = rss_kb(pid)
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(seconds / 3)
        now = rss_kb(pid)
        if abs(now - last) <= 64:
            return now
        last = now
    return last


class Sidecar:
    def __init__(self, binary: str, data: Path, log: Path):
        self.binary, self.data, self.log = binary, data, log
        self.port, self.admin = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        upstream = free_port()  # nothing listens there; nothing is ever called
        env = dict(os.environ, FAL_SIDECAR_WORKER_THREADS=str(os.cpu_count() or 2))
        self.proc = subprocess.Popen(
            [
                self.binary, "serve",
                "--upstream", f"http://127.0.0.1:{upstream}",
                "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{self.admin}",
                "--data-dir", str(self.data),
                "--max-queue", "100000000",
                "--max-concurrency", "0",
            ],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"sidecar exited ({self.proc.returncode}); log:\n{self.log.read_text()[-3000:]}")
            try:
                get(f"http://127.0.0.1:{self.admin}/metrics", 0.5)
                return
            except OSError:
                time.sleep(0.1)
        sys.exit("sidecar did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200_000, help="requests to queue (default 200000)")
    ap.add_argument("-c", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--bin", help="fal-sidecar binary (default: build release and use it)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")

    binary = args.bin
    if not binary:
        if not args.no_build:
            subprocess.run(["cargo", "build", "--release", "-p", "fal-sidecar"], cwd=ROOT, check=True)
        meta = json.loads(subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=ROOT, check=True, capture_output=True).stdout)
        binary = str(Path(meta["target_directory"]) / "release" / "fal-sidecar")

    work = Path(tempfile.mkdtemp(prefix="fal-qmem."))
    side = Sidecar(binary, work / "data", work / "sidecar.log")
    try:
        side.start()
        time.sleep(1)
        before = settle(side.proc.pid)
        (work / "submit.lua").write_text(LUA % {"n": args.n})
        t0 = time.time()
        # wrk runs for its -d even once the script stopped its thread: stop it ourselves.
        wrk = subprocess.Popen(
            ["wrk", "-t1", f"-c{args.c}", "-d600s", "-s", str(work / "submit.lua"),
             f"http://127.0.0.1:{side.port}/fal/queue/submit/"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while wrk.poll() is None and queue_depth(side.admin) < args.n:
            time.sleep(0.2)
        took = time.time() - t0
        wrk.send_signal(signal.SIGINT)
        out, err = wrk.communicate(timeout=60)
        if "Non-2xx" in out or err.strip():
            print(out, err, file=sys.stderr)
        queued = queue_depth(side.admin)
        after = settle(side.proc.pid)
        hwm = rss_kb(side.proc.pid, "VmHWM")
        per = (after - before) * 1024 / queued
        print(f"binary: {binary}")
        print(f"queued: {queued} in {took:.1f}s ({queued / took:.0f}/s, wrk -c{args.c})")
        print(f"RSS idle: {before} kB, after submits: {after} kB (peak {hwm} kB)")
        print(f"bytes per queued request: {per:.0f}")
        side.stop()

        side.start()
        settle(side.proc.pid)
        again = queue_depth(side.admin)
        restarted = settle(side.proc.pid)
        print(f"after restart: {again} queued, RSS {restarted} kB "
              f"(peak {rss_kb(side.proc.pid, 'VmHWM')} kB)")
        print(f"bytes per queued request after restart: {(restarted - before) * 1024 / again:.0f}")
        print(f"data directory: {sum(f.stat().st_size for f in (work / 'data').iterdir()) // 1024} kB")
    finally:
        side.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
