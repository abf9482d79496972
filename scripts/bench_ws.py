#!/usr/bin/env python3
"""WebSocket benchmarks (issue 19), each against a baseline in the same run:

1. echo round trip, one socket, sequential small messages: p50/p99 through the gateway
   of `fal-operator local` (→ the replica's fal-sidecar → the app) vs straight to an
   app of the same kind, and vs two nginx WebSocket proxies in the same two positions
   (nginx → nginx → the app, one nginx process each, as the gateway and the sidecar are
   two processes); the function has one replica, so every path ends in one app process;
2. messages/s over 100 sockets echoing at once, gateway vs straight (target ≥ 0.8×) and
   vs the nginx pair;
3. the gateway's memory per open idle socket: RSS of `fal-operator local` before and
   with 5,000 sockets open through it (target ≤ 16 KiB), to a second function with as
   many replicas as the sockets need (maxConcurrency is at most 1,024).

The app is an asyncio `websockets` echo server (one process can hold thousands of
sockets; examples/realtime_app.py is a thread per connection). The client is Python
asyncio on the same 2 cores, so ratios matter, not absolute numbers. With `--pin` (2+
cores) the client and every app process run on CPU 0 and the proxies (gateway and
sidecars, or the nginx pair) on CPU 1: the proxies' cost no longer comes out of the
client's and the app's CPU, as when the gateway runs on its own node.
--native BIN uses `sidecar/examples/ws_load.rs` (built with `cargo build --release -p
fal-sidecar --example ws_load`) as the echo app of the measured function and of the
direct path, and as the client of the echo and throughput parts: with Python at both
ends its event loop bounds the messages per second, and its pace changes from run to
run and with the order of the paths, so the proxies in between are not what is measured.
(The idle sockets stay with the Python client and app.)

Usage: scripts/bench_ws.py --operator target/release/fal-operator --sidecar target/release/fal-sidecar
           [--pin] [--native target/release/examples/ws_load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import REPO, Procs, accepts, free_port, get_json, start_redis, switches, wait  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "e2e"))
from helpers import descendants  # noqa: E402

from websockets.asyncio.client import connect  # noqa: E402

ECHO_APP = r'''
import asyncio, os
from websockets.asyncio.server import serve

async def echo(ws):
    async for m in ws:
        await ws.send(m)

async def health(conn, request):
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return conn.respond(200, "ok\n")

async def main():
    async with serve(echo, "127.0.0.1", int(os.environ["PORT"]), process_request=health,
                     backlog=4096, max_size=None, ping_interval=None, compression=None):
        await asyncio.Future()

asyncio.run(main())
'''


def is_app(pid: int) -> bool:
    """An app process (Python, or the native echo app), not a proxy."""
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return "python" in cmd[0].decode() or b"ws_load" in cmd[0]


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


async def round_trips(url: str, n: int) -> list[float]:
    out = []
    async with connect(url, compression=None, ping_interval=None) as ws:
        for i in range(50):
            await ws.send("warm")
            await ws.recv()
        for i in range(n):
            t0 = time.perf_counter()
            await ws.send("x" * 32)
            await ws.recv()
            out.append((time.perf_counter() - t0) * 1000)
    return out


async def throughput(url: str, sockets: int, seconds: float) -> float:
    end = time.monotonic() + seconds
    counts = [0] * sockets

    async def one(i: int):
        async with connect(url, compression=None, ping_interval=None, open_timeout=60) as ws:
            while time.monotonic() < end:
                await ws.send("y" * 64)
                await ws.recv()
                counts[i] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(sockets)))
    return sum(counts) / (time.monotonic() - t0)


async def hold_open(url: str, n: int, ready: asyncio.Event, release: asyncio.Event) -> int:
    opened = []

    async def one():
        ws = await connect(url, compression=None, ping_interval=None, open_timeout=120)
        opened.append(ws)

    for i in range(0, n, 250):  # in batches: a SYN storm of thousands helps nobody
        await asyncio.gather(*(one() for _ in range(min(250, n - i))))
    ready.set()
    await release.wait()
    await asyncio.gather(*(ws.close() for ws in opened))
    return len(opened)


# One nginx process per position (the gateway's, the sidecar's), as ours are two.
NGINX_CONF = """
worker_processes 1;
error_log stderr error;
pid {dir}/nginx-{name}.pid;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  proxy_http_version 1.1;
  proxy_set_header Upgrade $http_upgrade;
  proxy_set_header Connection $connection_upgrade;
  proxy_read_timeout 3600s;
  proxy_buffering off;
  tcp_nodelay on;
  server {{ listen 127.0.0.1:{listen}; location / {{ proxy_pass http://127.0.0.1:{to}; }} }}
}}
"""


def pin(pid: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(pid, {cpu})


def native(bin_: str, url: str, *args) -> dict:
    """One run of the native client (`ws_load load|rtt`) against a ws:// URL."""
    hostport, _, path = url.removeprefix("ws://").partition("/")
    out = subprocess.run([bin_, args[0], hostport, "/" + path, *map(str, args[1:])], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--operator", required=True)
    ap.add_argument("--sidecar", required=True)
    ap.add_argument("--round-trips", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--idle-sockets", type=int, default=5000)
    ap.add_argument("--pin", action="store_true", help="client and apps on CPU 0, proxies on CPU 1")
    ap.add_argument("--png", help="draw the comparison here (scripts/benchplot.py)")
    ap.add_argument("--native", metavar="WS_LOAD", help="native echo app and client (sidecar/examples/ws_load.rs)")
    a = ap.parse_args()
    if a.pin and (os.cpu_count() or 1) < 2:
        sys.exit("--pin needs 2 CPUs")
    cpu_client, cpu_proxy = (0, 1) if a.pin else (None, None)
    pin(0, cpu_client)  # this process is the client; children inherit it

    work = Path(tempfile.mkdtemp(prefix="fal-bench-ws."))
    procs = Procs()
    try:
        app = work / "echo_app.py"
        app.write_text(ECHO_APP)
        redis_port = start_redis(procs, work)
        direct_port = free_port()
        echo_cmd = [a.native, "echo"] if a.native else [sys.executable, str(app)]
        procs.spawn(echo_cmd, env={**os.environ, "PORT": str(direct_port)})
        wait(lambda: accepts(direct_port), what="the direct app")
        # Two nginx WebSocket proxies in the gateway's and the sidecar's positions.
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        ngx_front, ngx_back = free_port(), free_port()
        ngx_pids: list[int] = []
        # Proxies start on their CPU (not moved there later): a process sizes its thread
        # pools from the CPUs it may use, as it would on a node of its own.
        for name, listen, to in (("front", ngx_front, ngx_back), ("back", ngx_back, direct_port)):
            conf = work / f"nginx-{name}.conf"
            conf.write_text(NGINX_CONF.format(dir=work, name=name, listen=listen, to=to))
            pin(0, cpu_proxy)
            ngx = procs.spawn([nginx, "-p", str(work), "-c", str(conf), "-g", "daemon off;"])
            ngx_pids.append(ngx.pid)
            pin(0, cpu_client)
            wait(lambda: accepts(listen), what=f"nginx ({name})")
            for pid in [ngx.pid, *descendants(ngx.pid)]:
                pin(pid, cpu_proxy)
        # "ws" (echo and throughput): one replica, one app process like the direct path
        # and nginx's. "idle" (memory of open sockets): as many replicas as the sockets
        # need (maxConcurrency is at most 1,024).
        per_replica = 1024
        replicas = max(1, -(-a.idle_sockets // 1000))

        def function(name: str, n: int) -> dict:
            command = echo_cmd if name == "ws" else [sys.executable, str(app)]
            return {"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
                    "metadata": {"name": name, "namespace": "bench"},
                    "spec": {"image": "bench:1", "command": command, "minReplicas": n,
                             "maxReplicas": n, "maxConcurrency": per_replica, "keepAlive": 3600,
                             "auth": "public"}}
        manifest = work / "fn.yaml"
        manifest.write_text("\n---\n".join(json.dumps(function(*f)) for f in (("ws", 1), ("idle", replicas))))
        run_p, queue_p, admin_p = free_port(), free_port(), free_port()
        pin(0, cpu_proxy)
        local = procs.spawn([a.operator, "local", "-f", str(manifest), "--store", f"redis://127.0.0.1:{redis_port}/0",
                             "--listen", f"127.0.0.1:{run_p}", "--queue-listen", f"127.0.0.1:{queue_p}",
                             "--admin-listen", f"127.0.0.1:{admin_p}", "--sidecar-bin", a.sidecar,
                             "--state-dir", str(work / "state")],
                            env={**os.environ, "RUST_LOG": "warn"}, cwd=str(REPO))
        pin(0, cpu_client)
        wait(lambda: accepts(admin_p), what="fal-operator local")
        wait(lambda: sum(f["readyReplicas"] for f in get_json(f"http://127.0.0.1:{admin_p}/functions"))
             == 1 + replicas, timeout=120, what="the replicas")
        if a.pin:
            # gateway and sidecars on the proxy CPU, the apps on the client's
            for pid in [local.pid, *descendants(local.pid)]:
                pin(pid, cpu_client if is_app(pid) else cpu_proxy)
        direct = f"ws://127.0.0.1:{direct_port}/"
        gateway = f"ws://127.0.0.1:{run_p}/bench/ws/"
        nginx_url = f"ws://127.0.0.1:{ngx_front}/"

        rt = {"direct": [], "gateway": [], "nginx": []}
        tp = {"direct": [], "gateway": [], "nginx": []}
        # The proxies' processes (gateway and sidecars; the nginx pair), for their
        # context switches per message: how many messages a wake-up carries.
        proxies = {
            "gateway": [p for p in [local.pid, *descendants(local.pid)] if not is_app(p)],
            "nginx": [q for p in ngx_pids for q in [p, *descendants(p)]],
        }
        cs = {"gateway": [], "nginx": []}
        paths = [("direct", direct), ("gateway", gateway), ("nginx", nginx_url)]
        # A first pass, not counted: this process (the client) is slower on its first
        # thousands of messages (its heap grows), which would count against whichever
        # path came first. Then each round starts with another path, so over 3 rounds
        # every path is measured once first, once second and once last.
        def round_trips_of(url: str, n: int) -> list[float]:
            if a.native:
                r = native(a.native, url, "rtt", n)
                return [r["p50_ms"], r["p99_ms"]]  # kept per round; see rt_stat
            return asyncio.run(round_trips(url, n))

        def throughput_of(url: str, seconds: float) -> float:
            if a.native:
                return native(a.native, url, "load", 100, seconds)["messages_per_s"]
            return asyncio.run(throughput(url, 100, seconds))

        for name, url in paths:
            round_trips_of(url, 200)
            throughput_of(url, 1)
        for r in range(a.rounds):
            for name, url in paths[r % 3:] + paths[:r % 3]:
                rt[name].extend(round_trips_of(url, a.round_trips))
                before_cs = switches(proxies.get(name, []))
                tp[name].append(throughput_of(url, a.seconds))
                if name in cs:
                    after_cs = switches(proxies[name])
                    msgs = tp[name][-1] * a.seconds
                    cs[name].append(tuple((x - y) / msgs for x, y in zip(after_cs, before_cs)))
        tpm = {k: statistics.median(v) for k, v in tp.items()}

        def rt_stat(name: str, p: int) -> float:
            """p50/p99 of the round trips: over all of them (Python client), or the median
            of each round's (the native client reports [p50, p99] per round)."""
            if a.native:
                return statistics.median(rt[name][0 if p == 50 else 1::2])
            return pct(rt[name], p)

        time.sleep(2)
        before = rss_kb(local.pid)

        async def idle():
            ready, release = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(hold_open(f"ws://127.0.0.1:{run_p}/bench/idle/", a.idle_sockets,
                                                 ready, release))
            await ready.wait()
            await asyncio.sleep(3)
            opened = sum(f["syncCalls"] for f in get_json(f"http://127.0.0.1:{admin_p}/functions"))
            during = rss_kb(local.pid)
            release.set()
            await task
            return opened, during

        opened, during = asyncio.run(idle())
        per_socket = (during - before) / max(opened, 1)
        print(f"""
## WebSockets (fal-operator local: gateway -> fal-sidecar -> an asyncio echo app; {os.cpu_count()} cores, {"client and apps on CPU 0, proxies on CPU 1" if a.pin else "shared by everything"})

| echo, one socket, {a.round_trips} x {a.rounds} round trips{" (native client and app)" if a.native else ""} | p50 | p99 |
|---|---|---|
| straight to the app | {rt_stat('direct', 50):.3f} ms | {rt_stat('direct', 99):.3f} ms |
| through the gateway and the sidecar | {rt_stat('gateway', 50):.3f} ms | {rt_stat('gateway', 99):.3f} ms |
| through two nginx proxies (one process each) | {rt_stat('nginx', 50):.3f} ms | {rt_stat('nginx', 99):.3f} ms |

| 100 sockets echoing at once, {a.seconds:g} s, median of {a.rounds} (rounds: {", ".join(f"{g / d:.2f}" for g, d in zip(tp["gateway"], tp["direct"]))} vs direct) | messages/s | vs direct |
|---|---|---|
| straight to the app | {tpm['direct']:.0f} | 1.00× |
| through the gateway and the sidecar | {tpm['gateway']:.0f} | {tpm['gateway'] / tpm['direct']:.2f}× (target ≥ 0.80×) |
| through two nginx proxies (one process each) | {tpm['nginx']:.0f} | {tpm['nginx'] / tpm['direct']:.2f}× |

context switches of the proxies per message (voluntary / involuntary, median): gateway + sidecar {statistics.median(c[0] for c in cs['gateway']):.2f} / {statistics.median(c[1] for c in cs['gateway']):.2f}, the nginx pair {statistics.median(c[0] for c in cs['nginx']):.2f} / {statistics.median(c[1] for c in cs['nginx']):.2f}

gateway (fal-operator local) RSS: {before / 1024:.1f} MB idle, {during / 1024:.1f} MB with {opened} sockets open
→ **{per_socket:.1f} KiB per open idle socket** (target ≤ 16 KiB)
""")
        if a.png:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from benchplot import plot
            plot(a.png, f"WebSocket echo ({'pinned' if a.pin else 'shared cores'}): msg/s over 100 sockets, "
                 "RTT of one",
                 [(lbl, {"rps": tpm[k], "p50_ms": rt_stat(k, 50), "p99_ms": rt_stat(k, 99)})
                  for k, lbl in [("direct", "direct"), ("nginx", "2 nginx hops"), ("gateway", "gateway+sidecar")]],
                 baseline="direct", units=("messages/s", "ms round trip"))
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
