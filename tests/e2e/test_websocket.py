"""WebSockets through `fal-sidecar run` (issue 19), with the real `websockets` client and
`fal_client.realtime` against examples/realtime_app.py (HTTP and WebSockets on one
port): echo of text and binary, a 5 MiB message intact, 100 messages in order, the
app's close code, a refused upgrade passed as is, plain HTTP on the same port; the cap
(a socket takes a slot of --max-concurrency), the idle timeout, and the drain."""

from __future__ import annotations

import sys
import threading
import time

import fal_client
import fal_client.client as fal_client_module
import msgpack
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from helpers import REPO, free_port, wait_until

APP = [sys.executable, "-u", str(REPO / "examples" / "realtime_app.py")]


def ws_url(sc, path: str) -> str:
    return sc.run_url.replace("http://", "ws://") + path


def test_echo_large_ordered_close_code_refusal_and_http(make_sidecar):
    # Two slots: the socket holds one, the plain HTTP call beside it takes the other.
    sc = make_sidecar("--max-concurrency", "2", app_cmd=APP)
    with connect(ws_url(sc, "/ws/echo"), max_size=None) as ws:
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send(b"\x00\xff\x01")
        assert ws.recv() == b"\x00\xff\x01"
        big = bytes(range(256)) * (5 * 1024 * 1024 // 256)
        ws.send(big)
        assert ws.recv() == big, "a 5 MiB message intact"
        for i in range(100):
            ws.send(f"m{i}")
        assert [ws.recv() for _ in range(100)] == [f"m{i}" for i in range(100)]
        # Plain HTTP on the same port while the socket is open.
        r = sc.http.post(f"{sc.run_url}/test", json={"same": "port"})
        assert r.status_code == 200 and r.json()["input"] == {"same": "port"}
        # With both slots taken (a second socket), a call is refused, not run.
        with connect(ws_url(sc, "/ws/echo")) as second:
            second.send("x")
            assert second.recv() == "x"
            r = sc.http.post(f"{sc.run_url}/test", json={"third": 1})
            assert r.status_code == 503 and r.headers["x-fal-replica"] == "full", r.text
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed):
            ws.recv()
        assert (ws.close_code, ws.close_reason) == (4001, "closed by the app")
    # A refused upgrade reaches the client as the app sent it.
    with pytest.raises(InvalidStatus) as err:
        connect(ws_url(sc, "/nowhere"))
    assert err.value.response.status_code == 404
    metrics = sc.http.get(f"{sc.admin_url}/metrics").text
    assert 'fal_websocket_upgrades_total{outcome="upgraded"} 2' in metrics
    assert 'fal_websocket_upgrades_total{outcome="refused"} 1' in metrics
    wait_until(lambda: "fal_websockets_open 0" in sc.http.get(f"{sc.admin_url}/metrics").text, 10,
               what="the closed socket uncounted")


def test_bytes_in_the_handshakes_segment_pass_both_ways(make_sidecar):
    """A client's first frame sent in the same write as its handshake, and the app's
    greeting sent in the same write as its 101: both are read with the handshakes, before
    the switch, and must still reach the other side, first and in order."""
    import socket

    sc = make_sidecar(app_cmd=[sys.executable, "-u", str(REPO / "tests" / "e2e" / "early_bytes_app.py")])
    with socket.create_connection(("127.0.0.1", sc.listen_port), timeout=10) as s:
        s.sendall(b"GET /raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nEARLY;")
        got = b""
        while not got.endswith(b"EARLY;"):
            chunk = s.recv(65536)
            assert chunk, f"closed early: {got!r}"
            got += chunk
        head, rest = got.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert rest == b"GREETING;EARLY;", rest
        s.sendall(b"MORE")
        assert s.recv(65536) == b"MORE"


def test_fal_client_realtime_through_the_run_host(make_sidecar, monkeypatch):
    """fal_client.realtime (msgpack frames) and ws_connect, unmodified, through the
    sidecar's run host (`/{owner}/{alias}/realtime`), with the key header and with a
    token: the run host answers /tokens/ with keys off too."""
    port = free_port()
    # Sockets one after another: a closed socket's slot comes back when both sides have
    # closed, a moment after the client's close returns (slots to spare here).
    sc = make_sidecar("--run-host-listen", f"127.0.0.1:{port}", "--max-concurrency", "4", app_cmd=APP)
    monkeypatch.setenv("FAL_KEY", "any:key")
    monkeypatch.setattr(fal_client_module, "REALTIME_URL_FORMAT", f"ws://127.0.0.1:{port}/")
    monkeypatch.setattr(fal_client_module, "REST_URL", f"http://127.0.0.1:{port}")
    client = fal_client.SyncClient()
    for use_jwt in (False, True):
        with client.realtime("me/app", use_jwt=use_jwt) as rt:
            for i in range(3):
                rt.send({"prompt": f"p{i}"})
                assert rt.recv() == {"output": f"p{i}", "input": {"prompt": f"p{i}"}}
    with client.ws_connect("me/app", use_jwt=False, path="/ws/echo") as ws:
        ws.send("raw")
        assert ws.recv() == "raw"


def test_cap_and_idle_timeout(make_sidecar):
    """--max-concurrency 2: a third socket gets 503 + Retry-After. The idle timeout
    closes quiet sockets."""
    sc = make_sidecar("--max-concurrency", "2", "--websocket-idle-timeout", "1", app_cmd=APP)
    with connect(ws_url(sc, "/ws/echo")) as a, connect(ws_url(sc, "/ws/echo")) as b:
        with pytest.raises(InvalidStatus) as err:
            connect(ws_url(sc, "/ws/echo"))
        assert err.value.response.status_code == 503
        assert err.value.response.headers["retry-after"] == "1"
        b.send("keep")
        assert b.recv() == "keep"
        for ws in (a, b):
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
    # Their slots are free again.
    with connect(ws_url(sc, "/ws/echo")) as c:
        c.send("again")
        assert c.recv() == "again"


def test_drain_lets_sockets_run_then_cuts_them(make_sidecar):
    """/drain (a pod's preStop): no new socket (503), the open one runs on until the
    drain deadline, then it is cut."""
    sc = make_sidecar("--drain-timeout", "3", app_cmd=APP)
    drained = {}
    t = threading.Thread(target=lambda: drained.update(r=sc.http.post(f"{sc.admin_url}/drain", timeout=30)))
    with connect(ws_url(sc, "/ws/echo")) as ws:
        t0 = time.monotonic()
        t.start()
        wait_until(lambda: sc.http.get(f"{sc.admin_url}/readyz").status_code == 503, 10, what="draining")
        with pytest.raises(InvalidStatus) as err:
            connect(ws_url(sc, "/ws/echo"))
        assert err.value.response.status_code == 503
        ws.send("still")
        assert ws.recv() == "still", "an open socket runs on during the drain"
        t.join(30)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.send("x")
                ws.recv(timeout=10)
    assert time.monotonic() - t0 >= 2.5, "cut at the drain deadline, not before"
    assert drained["r"].status_code == 200
