#!/usr/bin/env python3
"""A small app that crashes on demand, for the supervision tests (test_supervise.py).

Listens on 127.0.0.1:$PORT. State that must survive its own crashes lives in
$CRASH_APP_DIR (required):

  starts              one line (the pid) per start: how many times it was started
  hold                while this file exists, a restart (not the first start) waits
                      before listening: the test decides when the app is back
  fail_after          if it holds N, starts after the N-th exit at once (a restart
                      that never listens)
  once-<key>          marker of /crash_once

Endpoints:
  GET  /health, /     {"ok": true}
  POST /ok            {"ok": true, "pid": <pid>, "starts": <n>}
  POST /crash         os._exit(1) before answering (a poison request)
  POST /crash_once?key=K   os._exit(1) on the first call for K, then {"ok": true, ...}
"""

import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

STATE = Path(os.environ["CRASH_APP_DIR"])


def starts() -> int:
    try:
        return len((STATE / "starts").read_text().splitlines())
    except FileNotFoundError:
        return 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = split.path
        if path in ("/", "/health"):
            return self._send(200, {"ok": True})
        if path == "/crash":
            print(f"crash: exiting on purpose (request {self.headers.get('x-fal-request-id')})", flush=True)
            os._exit(1)
        if path == "/crash_once":
            marker = STATE / f"once-{query.get('key', ['default'])[0]}"
            if not marker.exists():
                marker.write_text("crashed")
                print("crash_once: exiting on purpose", flush=True)
                os._exit(1)
        if path in ("/ok", "/crash_once"):
            return self._send(200, {"ok": True, "pid": os.getpid(), "starts": starts()})
        return self._send(404, {"detail": "no such route"})

    do_GET = do_POST = _handle


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    STATE.mkdir(parents=True, exist_ok=True)
    previous = starts()
    with open(STATE / "starts", "a") as f:
        f.write(f"{os.getpid()}\n")
    fail_after = STATE / "fail_after"
    if fail_after.exists() and previous >= int(fail_after.read_text().strip() or "0"):
        print(f"start {previous + 1}: failing on purpose (fail_after)", flush=True)
        os._exit(3)
    if previous > 0:
        while (STATE / "hold").exists():
            time.sleep(0.02)
    port = int(os.environ["PORT"])
    server = Server(("127.0.0.1", port), Handler)
    print(f"crash_app: start {previous + 1} (pid {os.getpid()}) listening on {port}", flush=True)
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
