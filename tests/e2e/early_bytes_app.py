"""A raw upgrade app for the bytes that travel in the same TCP segment as a handshake:
it answers `101` and a greeting in ONE write, then echoes every byte it gets (the first
of them may have arrived together with the handshake). Plain GETs get 200 (readiness).
No WebSocket framing: the proxies in between must not care."""

from __future__ import annotations

import os
import socket
import threading

GREETING = b"GREETING;"


def serve(conn: socket.socket) -> None:
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        if b"upgrade: websocket" not in head.lower():
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
            return
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
                     + GREETING)
        if rest:
            conn.sendall(rest)
        while chunk := conn.recv(65536):
            conn.sendall(chunk)


def main() -> None:
    srv = socket.create_server((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8080"))))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
