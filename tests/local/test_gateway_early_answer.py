"""An app that answers before it has read a large request body, through the gateway's
fast lane and the replica's (sidecar/src/api/fast.rs): the caller gets the app's own
answer (not a 502 for the write the app refused), and the connection closes cleanly
once the caller has sent its body. A body over the 1 MiB the gateway reads whole first
is streamed through both lanes, so both watch the app's side while they send."""

from __future__ import annotations

import json
import socket
import sys

from helpers import REPO, send_in_background
from local_proc import function

RAW_APP = [sys.executable, "-u", str(REPO / "tests" / "e2e" / "raw_app.py")]


def read_answer(s: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one answer framed by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, body
        body += chunk
    return head, body


def test_an_early_answer_crosses_both_lanes(make_local):
    g = make_local([function("raw", command=RAW_APP, minReplicas=1, maxReplicas=1, keepAlive=60)])
    g.wait_ready("default/raw", 1)
    host, port = g.run_url.removeprefix("http://").rsplit(":", 1)
    body = b"x" * (4 * 1024 * 1024)
    for path, status in (("early-close", 413), ("early-open", 401)):
        s = socket.create_connection((host, int(port)), timeout=20)
        sender = send_in_background(s, b"POST /default/raw/%s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                                    % (path.encode(), len(body)) + body)
        head, answer = read_answer(s)
        assert head.startswith(b"HTTP/1.1 %d " % status), head
        assert json.loads(answer)["detail"]
        sender.join(20)
        assert not sender.is_alive()
        # The replica's lane read the rest of the body (the app answered before it did):
        # the gateway's connection stayed in step, and the caller's goes on, unless the
        # gateway had body left too, in which case it closes.
        if b"connection: close" in head.lower():
            assert s.recv(65536) == b""
        else:
            s.sendall(b"GET /default/raw/x HTTP/1.1\r\nHost: h\r\n\r\n")
            head, answer = read_answer(s)
            assert head.startswith(b"HTTP/1.1 200 ") and answer == b"ok", (head, answer)
        s.close()
