"""A small realtime app: plain HTTP and WebSockets on one port, Python's standard library
only (msgpack for the realtime endpoint, as fal's clients speak it).

    fal-sidecar run -- python3 examples/realtime_app.py

  * GET  /health        200 (readiness)
  * POST /test          {"message": …, "input": <the JSON body>} — plain HTTP on the same port
  * WS   /realtime      fal realtime: each binary frame is a msgpack map; the answer is
                        a msgpack map {"output": <the input's "prompt">, "input": <the map>}
  * WS   /ws/echo       echoes every text and binary message; the text "close:CODE"
                        closes the socket with that code (e.g. close:4001)
  * WS   /ws/request    first sends the handshake it saw ({"path", "headers"} as JSON
                        text), then echoes
  * WS   anything else  refused with 404 (the handshake fails, as a real app's would)

The app listens on $HOST:$PORT (default 127.0.0.1:8080). One thread per connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455
MAX_MESSAGE = 64 * 1024 * 1024


class Closed(Exception):
    pass


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise Closed()
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[bool, int, bytes]:
    """(fin, opcode, payload) of one client frame (clients mask theirs)."""
    b0, b1 = read_exact(sock, 2)
    fin, opcode, masked, n = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", read_exact(sock, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", read_exact(sock, 8))
    if n > MAX_MESSAGE:
        raise Closed()
    mask = read_exact(sock, 4) if masked else b"\0\0\0\0"
    data = read_exact(sock, n)
    if masked:
        # XOR with the 4-byte mask, word at a time (a 5 MiB message stays fast).
        m = int.from_bytes(mask * 2, "little")
        whole = len(data) - len(data) % 8
        out = bytearray(data)
        view = memoryview(out)
        for i in range(0, whole, 8):
            view[i:i + 8] = (int.from_bytes(view[i:i + 8], "little") ^ m).to_bytes(8, "little")
        for i in range(whole, len(data)):
            out[i] ^= mask[i % 4]
        data = bytes(out)
    return bool(fin), opcode, data


def send_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    sock.sendall(head + payload)


def messages(sock: socket.socket):
    """(opcode, payload) of each whole message; answers pings; ends on close."""
    parts, first = [], None
    while True:
        fin, opcode, data = read_frame(sock)
        if opcode == 0x8:  # close: answer with the same code
            send_frame(sock, 0x8, data[:2])
            return
        if opcode == 0x9:
            send_frame(sock, 0xA, data)
            continue
        if opcode == 0xA:
            continue
        if opcode in (0x1, 0x2):
            first, parts = opcode, [data]
        else:  # continuation
            parts.append(data)
        if fin:
            yield first, b"".join(parts)


def close(sock: socket.socket, code: int, reason: str = "") -> None:
    send_frame(sock, 0x8, struct.pack("!H", code) + reason.encode())


def echo(sock: socket.socket, request=None) -> None:
    for opcode, data in messages(sock):
        if opcode == 0x1 and data.startswith(b"close:"):
            close(sock, int(data[6:]), "closed by the app")
            return
        send_frame(sock, opcode, data)


def request_then_echo(sock: socket.socket, request) -> None:
    seen = {"path": request.path, "headers": {k.lower(): v for k, v in request.headers.items()}}
    send_frame(sock, 0x1, json.dumps(seen).encode())
    echo(sock)


def realtime(sock: socket.socket, request=None) -> None:
    import msgpack  # fal's realtime frames; installed with fal-client

    for opcode, data in messages(sock):
        if opcode != 0x2:
            send_frame(sock, 0x1, json.dumps({"type": "x-fal-error", "error": "BAD_REQUEST",
                                              "reason": "send msgpack in binary frames"}).encode())
            continue
        msg = msgpack.unpackb(data)
        send_frame(sock, 0x2, msgpack.packb({"output": msg.get("prompt"), "input": msg}))


SOCKETS = {"/realtime": realtime, "/ws/echo": echo, "/ws/request": request_then_echo}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self._upgrade(path)
        if path == "/health":
            return self._json(200, {"status": "ok"})
        return self._json(404, {"detail": f"no route {path}"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path.split("?", 1)[0] == "/test":
            return self._json(200, {"message": "Hello from fal-serverless!",
                                    "input": json.loads(body or b"null")})
        return self._json(404, {"detail": "no route"})

    def _upgrade(self, path: str) -> None:
        handler = SOCKETS.get(path)
        key = self.headers.get("Sec-WebSocket-Key")
        if handler is None or not key:
            return self._json(404, {"detail": f"no WebSocket at {path}"})
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            handler(self.connection, self)
        except (Closed, OSError):
            pass


class Server(ThreadingHTTPServer):
    # socketserver's default backlog (5) drops handshakes when hundreds arrive at once.
    request_queue_size = 1024
    daemon_threads = True


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    # Loopback by default (the sidecar is in front); HOST=0.0.0.0 in a pod, where the
    # kubelet probes the pod's address.
    host = os.environ.get("HOST", "127.0.0.1")
    server = Server((host, port), Handler)
    print(f"realtime app listening on {host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
