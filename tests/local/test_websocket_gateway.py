"""WebSockets through the gateway of `fal-operator local` (issue 19), with the real
`websockets` client and `fal_client.realtime`, against examples/realtime_app.py: the
splice, a handshake held at zero while the function starts, an open socket keeping its
replica past keepAlive (and zero again after it closes), 200 concurrent sockets, and the
key check on the handshake (a key header, or a token of /tokens/ in the query)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sys
import time
import uuid

import fal_client
import fal_client.client as fal_client_module
import pytest
from helpers import REPO
from local_proc import function
from helpers import wait_until
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

APP = [sys.executable, "-u", str(REPO / "examples" / "realtime_app.py")]


def ws(loc, key: str, path: str) -> str:
    return f"{loc.run_url.replace('http://', 'ws://')}/{key}{path}"


def stays(check, seconds: float, interval: float = 0.1):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert check()
        time.sleep(interval)


def test_splice_through_the_gateway(make_local):
    loc = make_local([function("rt", command=APP, minReplicas=1, maxConcurrency=4)])
    loc.wait_ready("default/rt", 1)
    with connect(ws(loc, "default/rt", "/ws/echo"), max_size=None) as c:
        c.send("hello")
        assert c.recv() == "hello"
        c.send(b"\x01\x02")
        assert c.recv() == b"\x01\x02"
        big = secrets.token_bytes(5 * 1024 * 1024)
        c.send(big)
        assert c.recv() == big, "a 5 MiB message intact"
        for i in range(100):
            c.send(str(i))
        assert [c.recv() for _ in range(100)] == [str(i) for i in range(100)]
        assert loc.fn("default/rt")["syncCalls"] == 1, "an open socket is a call in flight"
        r = loc.http.post(f"{loc.run_url}/default/rt/test", json={"same": "port"})
        assert r.status_code == 200 and r.json()["input"] == {"same": "port"}
        c.send("close:4001")
        with pytest.raises(ConnectionClosed):
            c.recv()
        assert c.close_code == 4001
    with pytest.raises(InvalidStatus) as err:
        connect(ws(loc, "default/rt", "/nowhere"))
    assert err.value.response.status_code == 404
    wait_until(lambda: loc.fn("default/rt")["syncCalls"] == 0, 10, what="the slot given back")
    assert 'fal_gateway_websockets_open{function="default/rt"} 0' in loc.http.get(f"{loc.admin_url}/metrics").text


def test_held_at_zero_kept_past_keepalive_then_zero(make_local):
    """At zero the handshake is held while a replica starts; the open socket keeps that
    replica well past keepAlive; after it closes the function goes back to zero."""
    loc = make_local([function("rt0", command=APP, keepAlive=2)])
    key = "default/rt0"
    assert loc.processes(key) == []
    with connect(ws(loc, key, "/ws/echo"), open_timeout=120) as c:
        c.send("woke")
        assert c.recv() == "woke"
        assert loc.fn(key)["readyReplicas"] == 1
        # Three times keepAlive with the socket open (and quiet): the replica stays.
        stays(lambda: len(loc.processes(key)) == 1 and loc.fn(key)["desiredReplicas"] == 1, 6)
        c.send("still")
        assert c.recv() == "still"
    loc.wait_processes(key, 0, timeout=60)


def test_two_hundred_sockets_at_once(make_local):
    loc = make_local([function("many", command=APP, minReplicas=1, maxConcurrency=256)])
    loc.wait_ready("default/many", 1)
    url = ws(loc, "default/many", "/ws/echo")

    async def one(i: int) -> list[str]:
        async with aconnect(url, open_timeout=60) as c:
            got = []
            for j in range(20):
                await c.send(f"{i}:{j}")
                got.append(await c.recv())
            return got

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(all_of_them())
    assert all(r == [f"{i}:{j}" for j in range(20)] for i, r in enumerate(results)), "no message lost or reordered"


def falkey(namespace: str) -> tuple[dict, str]:
    key_id, secret = str(uuid.uuid4()), secrets.token_hex(32)
    return ({"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalKey",
             "metadata": {"name": "rt", "namespace": namespace},
             "spec": {"keyId": key_id, "secretSha256": hashlib.sha256(secret.encode()).hexdigest()}},
            f"{key_id}:{secret}")


def test_realtime_clients_with_keys(make_local, monkeypatch):
    """The handshake needs a key or a token (401 before any upgrade); fal_client.realtime
    with the key header (use_jwt=False) and with a token from /tokens/ (the default),
    unmodified; neither the key nor the token reaches the app."""
    kdoc, fal_key = falkey("team-a")
    loc = make_local([function("rt", "team-a", command=APP, minReplicas=1, maxConcurrency=8), kdoc])
    loc.wait_ready("team-a/rt", 1)
    with pytest.raises(InvalidStatus) as err:
        connect(ws(loc, "team-a/rt", "/ws/echo"))
    assert err.value.response.status_code == 401
    monkeypatch.setattr(fal_client_module, "REALTIME_URL_FORMAT", f"{loc.run_url.replace('http://', 'ws://')}/")
    monkeypatch.setattr(fal_client_module, "REST_URL", loc.run_url)
    client = fal_client.SyncClient(key=fal_key)
    for use_jwt in (False, True):
        with client.realtime("team-a/rt", use_jwt=use_jwt) as rt:
            rt.send({"prompt": f"jwt={use_jwt}"})
            assert rt.recv() == {"output": f"jwt={use_jwt}", "input": {"prompt": f"jwt={use_jwt}"}}
        with client.ws_connect("team-a/rt", use_jwt=use_jwt, path="/ws/request") as c:
            seen = json.loads(c.recv())
            assert "fal_jwt_token" not in seen["path"], seen
            assert "authorization" not in seen["headers"], seen
            c.send("ok")
            assert c.recv() == "ok"


def test_npm_client_realtime(make_local):
    """@fal-ai/client's fal.realtime.connect, pointed at the gateway (its token request
    through requestMiddleware, its WebSocket through a URL-rewriting global): a token
    from /tokens/, msgpack both ways."""
    import shutil
    import subprocess

    kdoc, fal_key = falkey("team-a")
    loc = make_local([function("rt", "team-a", command=APP, minReplicas=1, maxConcurrency=8), kdoc])
    loc.wait_ready("team-a/rt", 1)
    node = shutil.which("node")
    assert node, "node is needed for the npm client test"
    js = REPO / "tests" / "js"
    proc = subprocess.run(
        [node, "--experimental-websocket", str(js / "realtime_check.mjs"), loc.run_url, "team-a/rt"],
        capture_output=True, text=True, timeout=120, cwd=js,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "FAL_KEY": fal_key},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["results"] == [{"output": f"p{i}", "input": {"prompt": f"p{i}"}} for i in range(3)], out
    assert out["urls"][0].startswith(loc.run_url.replace("http://", "ws://") + "/team-a/rt/realtime?fal_jwt_token="), out
