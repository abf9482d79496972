#!/usr/bin/env python3
"""A probe of the cluster's plumbing, run as a pod by tests/cluster/test_network.py
(`command: [python3, netcheck.py]`: the test kubelet's default working directory is
this one). It answers on $PORT (default 8000), on every address of its pod:

  GET  /hello               its pod name (HOSTNAME)
  GET  /fetch?url=U         fetches U from inside the pod: {"status", "body"} or {"error"}
  GET  /resolve?name=N      getaddrinfo(N) in the pod: {"addresses"} or {"error"}
  GET  /env                 its environment
  GET  /file?path=P         a file's content (404 if missing); /etc/resolv.conf too
  POST /file?path=P         writes the request body to P
  GET  /api?path=/api/v1/…  an API request as in-cluster clients make it: to
                            https://kubernetes.default.svc (DNS, the Service's cert
                            name), with the token and ca.crt of the service account
                            volume: {"status", "body"} or {"error"}

Standard library only; it exits with the test kubelet (its parent) like app.py.
"""

import json
import os
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def fetch(url, headers=None, context=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as resp:
            return {"status": resp.status, "body": resp.read().decode(errors="replace")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode(errors="replace")}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(e).__name__}: {e}"}


class Handler(BaseHTTPRequestHandler):
    def reply(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else (
            body.encode() if isinstance(body, str) else json.dumps(body).encode())
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        url = urllib.parse.urlparse(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        if url.path == "/hello":
            return self.reply(200, os.environ.get("HOSTNAME", "?"), "text/plain")
        if url.path == "/fetch":
            return self.reply(200, fetch(q["url"]))
        if url.path == "/resolve":
            try:
                infos = socket.getaddrinfo(q["name"], None, socket.AF_INET, socket.SOCK_STREAM)
                return self.reply(200, {"addresses": sorted({i[4][0] for i in infos})})
            except OSError as e:
                return self.reply(200, {"error": str(e)})
        if url.path == "/env":
            return self.reply(200, dict(os.environ))
        if url.path == "/file":
            try:
                with open(q["path"], "rb") as f:
                    return self.reply(200, f.read(), "application/octet-stream")
            except FileNotFoundError:
                return self.reply(404, {"error": "not found"})
        if url.path == "/api":
            # What client libraries' in-cluster config does, by name rather than by
            # KUBERNETES_SERVICE_HOST: the name must resolve and be in the certificate.
            with open(f"{SA}/token") as f:
                token = f.read().strip()
            ctx = ssl.create_default_context(cafile=f"{SA}/ca.crt")
            return self.reply(200, fetch("https://kubernetes.default.svc" + q["path"],
                                         {"Authorization": f"Bearer {token}"}, ctx))
        self.reply(404, {"error": "no such path"})

    def do_POST(self):  # noqa: N802
        url = urllib.parse.urlparse(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        if url.path != "/file":
            return self.reply(404, {"error": "no such path"})
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(q["path"], "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        self.reply(200, {"written": len(body)})

    def log_message(self, *args):
        pass


def exit_with_parent():
    parent = os.getppid()
    while True:
        threading.Event().wait(1)
        if os.getppid() != parent:
            os._exit(0)


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=exit_with_parent, daemon=True).start()
    print(f"netcheck listening on :{port} (pod {os.environ.get('HOSTNAME', '?')})", flush=True)
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    sys.exit(main())
