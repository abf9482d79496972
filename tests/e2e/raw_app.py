"""An app that speaks HTTP/1.1 by hand, to give the sidecar's fast lane
(sidecar/src/api/fast.rs) every kind of answer a real app may send: chunked with a
trailer, HTTP/1.0 read-to-close, an interim 103 first, `Connection: close`, a cut-off
body, no HTTP at all. It echoes the raw request it got (`/head`), and counts its
connections and the calls whose client went away (`/log`)."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time

STATE = {"connections": 0, "cancelled": 0}
LOCK = threading.Lock()


def read_request(conn: socket.socket, data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, rest) of the next request, or None at EOF. The `/early…` and
    `/duplex` paths answer before reading the body: their body is left unread."""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if head.split(b" ", 2)[1].startswith((b"/early", b"/duplex")):
        return head + b"\r\n\r\n", b"", rest
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head + b"\r\n\r\n", rest[:length], rest[length:]


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def serve(conn: socket.socket) -> None:
    with LOCK:
        STATE["connections"] += 1
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = b""
    with conn:
        while True:
            req = read_request(conn, data)
            if req is None:
                return
            head, body, data = req
            path = head.split(b" ", 2)[1].decode().split("?")[0]
            if path == "/head":
                conn.sendall(answer(head + body))
            elif path == "/chunked":
                conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n"
                             b"5\r\nhello\r\n")
                time.sleep(0.05)  # the rest in another segment
                conn.sendall(b"7;ext=1\r\n, world\r\n0\r\nx-sum: 12\r\n\r\n")
            elif path == "/until-close":
                conn.sendall(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
                time.sleep(0.05)
                conn.sendall(b"the end")
                return
            elif path == "/interim":
                conn.sendall(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
                conn.sendall(answer(b"after the hints"))
            elif path == "/close":
                conn.sendall(answer(b"closing", extra="connection: close\r\n"))
                return
            elif path == "/garbage":
                conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                return
            elif path == "/cut":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                return
            elif path == "/slow":
                # Answers after 5 s, unless the caller goes away first.
                readable, _, _ = select.select([conn], [], [], 5.0)
                if readable and not conn.recv(1, socket.MSG_PEEK):
                    with LOCK:
                        STATE["cancelled"] += 1
                    return
                conn.sendall(answer(b"slow"))
            elif path == "/early-close":
                # Refuses the body unread and closes (a reset, with the body unread).
                conn.sendall(answer(b'{"detail": "too large for this app"}', "413 Content Too Large"))
                return
            elif path == "/early-open":
                # Refuses the body unread and keeps the connection, reading nothing more.
                conn.sendall(answer(b'{"detail": "who are you?"}', "401 Unauthorized"))
                time.sleep(8)
                return
            elif path == "/duplex":
                # Starts its answer, then reads the whole body, then ends the answer with
                # the body's length: full duplex, as an app streaming progress may do.
                length = int(next(v for n, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                                  if n.strip().lower() == b"content-length").strip())
                conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\nreading \r\n")
                got = len(data)
                while got < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    got += len(chunk)
                data = b""
                end = b"%d bytes" % got
                conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
            elif path == "/log":
                with LOCK:
                    conn.sendall(answer(json.dumps(STATE).encode()))
            else:
                conn.sendall(answer(b"ok"))


def main() -> None:
    srv = socket.create_server((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8080"))))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
