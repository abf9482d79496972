"""The backend of the differential corpus: an HTTP/1.1 server that records every request
it receives, whole, as one JSON line, and answers 200.

    python recording_app.py RECORDS.jsonl [PORT]      (PORT defaults to $PORT)

It stands behind nginx, behind `fal-sidecar run` and behind the gateway of
`fal-operator local`, so "what reached the backend" is measured the same way for each.
It parses with h11 (strict; it comes with httpx, in tests/requirements.txt): a request counts once its body is complete; bytes h11
refuses are recorded too, as `{"malformed": …}` with what was received, since they did
reach the backend.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import h11

_lock = threading.Lock()


def record(log, entry: dict) -> None:
    line = json.dumps(entry, sort_keys=True) + "\n"
    with _lock:
        log.write(line)
        log.flush()


def serve(sock: socket.socket, log) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    raw = bytearray()
    req = None
    body = bytearray()
    try:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                record(log, {"malformed": str(e), "raw": raw[-4096:].decode("latin-1")})
                return
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                raw += data
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return
                continue
            if isinstance(event, h11.Request):
                req, body = event, bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                target = req.target.decode("latin-1")
                record(log, {
                    "method": req.method.decode("latin-1"),
                    "target": target,
                    "body": body.decode("latin-1"),
                    "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers],
                })
                payload = f"ok {target}\n".encode("latin-1")
                out = conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "text/plain"), ("content-length", str(len(payload)))]))
                sock.sendall(out + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                raw.clear()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (OSError, h11.LocalProtocolError):
        return
    finally:
        sock.close()


def main() -> None:
    path = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else int(os.environ["PORT"])
    log = open(path, "a", encoding="utf-8")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(256)
    while True:
        sock, _ = srv.accept()
        threading.Thread(target=serve, args=(sock, log), daemon=True).start()


if __name__ == "__main__":
    main()
