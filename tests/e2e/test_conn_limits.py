"""Connection-level limits: oversized request heads get 431, and a client that dribbles
its headers (slowloris) is cut off after --header-timeout."""

from __future__ import annotations

import socket
import time

import httpx


def test_oversized_headers_get_431(sidecar):
    for url in (f"{sidecar.run_url}/test", f"{sidecar.queue_url}/test/app/test"):
        r = httpx.post(url, headers={"x-big": "a" * 100_000}, json={})
        assert r.status_code == 431, (url, r.status_code)
    # Normal requests are unaffected.
    assert httpx.post(f"{sidecar.run_url}/test", json={}).status_code == 200


def test_slow_header_senders_are_disconnected(make_sidecar):
    sc = make_sidecar("--header-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", sc.queue_port)) as s:
        s.sendall(b"POST /test/app/test HTTP/1.1\r\nHost: x\r\n")  # and never finish
        s.settimeout(10)
        started = time.monotonic()
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        waited = time.monotonic() - started
    # Closed by the server (an error response may precede the close), well before our
    # 10 s socket timeout would have fired.
    assert waited < 9, waited
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
    # The sidecar still serves others.
    assert httpx.post(f"{sc.run_url}/test", json={}).status_code == 200
