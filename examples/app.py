#!/usr/bin/env python3
"""Example HTTP app for fal-sidecar (Python standard library only).

Run it behind the sidecar:

    fal-sidecar run -- python3 examples/app.py

or on its own:

    PORT=8000 python3 examples/app.py

It listens on 127.0.0.1:$PORT (default 8000) and serves a few endpoints that the
end-to-end tests use to observe what the sidecar does. Parameters of the POST
endpoints can be given in the query string or in a JSON object body (the query
string wins), e.g. `POST /slow?seconds=2` or `POST /slow` with `{"seconds": 2}`.

  GET  / , /health            {"ok": true}   (any method is accepted)
  POST /test                  {"message": "Hello from fal-serverless!", "input": <json>}
  *    /echo[/...]            what the app received (method, path, query, headers, body)
  POST /slow?seconds=S        sleep S s in 0.05 s steps; 499 if cancelled meanwhile
  POST /fail?status=N&key=K   status N with {"detail": ...}; counted under K
  POST /logs?lines=N          N stdout lines "log line i", one stderr line
  POST /flaky?key=K&fail=N&status=S   first N calls for K fail with S (503)
  GET  /calls?key=K           {"calls": n} for /flaky and /fail calls with key K
  POST /<anything>/cancel     records x-fal-request-id as cancelled
  GET  /seen                  the last 100 requests (path, x-fal-request-id, x-fal-endpoint)
  POST /bytes?n=N             N bytes of b"x", application/octet-stream
  POST /notjson               200 text/plain "plain text"
"""

import collections
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_lock = threading.Lock()
_cancelled = set()  # x-fal-request-id values for which a cancel arrived
_calls = collections.Counter()  # key -> number of /flaky or /fail calls
_seen = collections.deque(maxlen=100)


class Handler(BaseHTTPRequestHandler):
    # Send each response in one write with Nagle off: a header write followed by a small
    # body write otherwise waits ~40 ms for a delayed ACK on keep-alive connections.
    wbufsize = -1
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "fal-example-app/1.0"

    # -- plumbing ---------------------------------------------------------
    def log_message(self, format, *args):  # keep stderr for the app's own logs
        pass

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until an empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status, body, content_type="application/json", headers=None):
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_bytes(self, n):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command == "HEAD":
            return
        chunk = b"x" * 65536
        left = n
        while left > 0:
            part = chunk if left >= len(chunk) else chunk[:left]
            self.wfile.write(part)
            left -= len(part)
        self.wfile.flush()

    def _param(self, name, default=None):
        values = self._query.get(name)
        if values:
            return values[0]
        if isinstance(self._json, dict) and name in self._json:
            return self._json[name]
        return default

    # -- dispatch ---------------------------------------------------------
    def _handle(self):
        split = urlsplit(self.path)
        path = split.path or "/"
        self._query = parse_qs(split.query, keep_blank_values=True)
        body = self._read_body()
        text = body.decode("utf-8", errors="replace")
        try:
            self._json = json.loads(text) if body else None
        except ValueError:
            self._json = None
        request_id = self.headers.get("x-fal-request-id")
        method = self.command

        if path != "/seen":
            with _lock:
                _seen.append(
                    {
                        "method": method,
                        "path": path,
                        "x-fal-request-id": request_id,
                        "x-fal-endpoint": self.headers.get("x-fal-endpoint"),
                    }
                )

        try:
            self._route(method, path, split.query, body, text, request_id)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # never leave a client without an answer
            try:
                self._send(500, {"detail": f"app error: {exc!r}"})
            except Exception:
                pass

    def _route(self, method, path, raw_query, body, text, request_id):
        if path in ("/", "/health"):
            return self._send(200, {"ok": True})

        if method == "POST" and path.endswith("/cancel") and len(path) > len("/cancel"):
            with _lock:
                _cancelled.add(request_id)
            print(f"cancel: {request_id}", flush=True)
            return self._send(200, {"cancelled": request_id})

        if path == "/echo" or path.startswith("/echo/"):
            headers = {}
            for name, value in self.headers.items():
                key = name.lower()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            return self._send(
                200,
                {
                    "method": method,
                    "path": path,
                    "query": raw_query,
                    "headers": headers,
                    "body": text,
                    "json": self._json,
                },
            )

        if method == "POST" and path == "/test":
            return self._send(
                200, {"message": "Hello from fal-serverless!", "input": self._json}
            )

        if method == "POST" and path == "/slow":
            seconds = float(self._param("seconds", 1))
            print(f"slow: starting {seconds:g} s", flush=True)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                with _lock:
                    cancelled = request_id is not None and request_id in _cancelled
                if cancelled:
                    print("slow: cancelled", flush=True)
                    return self._send(499, {"detail": "cancelled"})
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            print("slow: done", flush=True)
            return self._send(200, {"slept": seconds})

        if method == "POST" and path == "/fail":
            status = int(self._param("status", 500))
            key = self._param("key")
            if key is not None:
                with _lock:
                    _calls[str(key)] += 1
            return self._send(status, {"detail": f"failing on purpose with {status}"})

        if method == "POST" and path == "/logs":
            lines = int(self._param("lines", 3))
            for i in range(lines):
                print(f"log line {i}", flush=True)
                time.sleep(0.02)
            print("warning on stderr", file=sys.stderr, flush=True)
            time.sleep(0.02)
            return self._send(200, {"printed": lines})

        if method == "POST" and path == "/flaky":
            key = str(self._param("key", "default"))
            fail = int(self._param("fail", 1))
            status = int(self._param("status", 503))
            with _lock:
                _calls[key] += 1
                total = _calls[key]
            if total <= fail:
                return self._send(status, {"detail": "flaky"})
            return self._send(200, {"calls": total})

        if method == "GET" and path == "/calls":
            key = str(self._param("key", "default"))
            with _lock:
                total = _calls[key]
            return self._send(200, {"calls": total})

        if method == "GET" and path == "/seen":
            with _lock:
                seen = list(_seen)
            return self._send(200, seen)

        if method == "POST" and path == "/bytes":
            return self._send_bytes(int(self._param("n", 0)))

        if method == "POST" and path == "/notjson":
            return self._send(200, b"plain text", content_type="text/plain")

        return self._send(404, {"detail": "no such route"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def _exit_with_parent():
    """Exit when the process that started us (e.g. the sidecar) goes away."""
    parent = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = Server(("127.0.0.1", port), Handler)
    if os.environ.get("APP_EXIT_WITH_PARENT", "1") != "0":
        threading.Thread(target=_exit_with_parent, daemon=True).start()
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
