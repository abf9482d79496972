"""Scale to zero, end to end, with `fal-operator local`: the gateway and the autoscaler
over a real Redis, replicas as real `fal-sidecar run` processes, the real fal clients.

Waits are polls with deadlines (no timed assertions): "stays at zero" is checked over
a window several times the autoscaler's tick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fal_client
import fal_client.client as fal_client_module
import httpx
import pytest
from helpers import REPO, alive, descendants
from local_proc import function
from helpers import wait_until
from redis_fixture import RedisServer
from webhook_receiver import WebhookReceiver


def stays(check, seconds: float, interval: float = 0.1):
    """`check()` holds at every look for `seconds` (a window, not a timing claim)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert check()
        time.sleep(interval)


@pytest.fixture
def fal(monkeypatch):
    def point(local):
        monkeypatch.setenv("FAL_KEY", "local-key-id:local-key-secret")
        monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{local.queue_url}/")
        monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{local.run_url}/")
        return fal_client.SyncClient()
    return point


def test_zero_until_a_submit_then_back_to_zero(make_local, fal):
    """A minReplicas-0 function stays at zero; a fal-client submit through the gateway
    wakes it and completes; after keepAlive it is back at zero, and its status and
    result are still served without waking it."""
    loc = make_local([function("wake", keepAlive=2)])
    key = "default/wake"
    stays(lambda: loc.processes(key) == [], 2.5)
    client = fal(loc)
    handle = client.submit(key + "/test", arguments={"prompt": "hi"})
    result = handle.get()
    assert result["input"] == {"prompt": "hi"}
    assert loc.fn(key)["replicas"] == 1
    # keepAlive (2 s) after the completion: drained and stopped.
    loc.wait_processes(key, 0, timeout=30)
    assert loc.fn(key)["desiredReplicas"] == 0
    # Reading at zero: answered from the store, and it does not wake the function.
    for _ in range(3):
        st = loc.status(key, handle.request_id)
        assert st.status_code == 200 and st.json()["status"] == "COMPLETED"
        r = loc.result(key, handle.request_id)
        assert r.status_code == 200 and r.json()["input"] == {"prompt": "hi"}
    stays(lambda: loc.processes(key) == [], 2.5)


def test_sync_call_at_zero_is_held_then_answered(make_local):
    loc = make_local([function("sync0", keepAlive=30), function("unused", keepAlive=30)])
    key = "default/sync0"
    assert loc.processes(key) == []
    # A function nobody has called has no request or socket series in the gateway yet
    # (each costs memory in a gateway that knows thousands of functions); a request of a
    # kind makes its series.
    metrics = loc.http.get(f"{loc.admin_url}/metrics").text
    for name in ("sync0", "unused"):
        for series in ("fal_gateway_requests_total", "fal_gateway_websockets_open"):
            assert f'{series}{{function="default/{name}"' not in metrics
    r = loc.http.post(f"{loc.run_url}/{key}/test", json={"n": 1})
    assert r.status_code == 200, r.text
    assert r.json()["input"] == {"n": 1}
    assert loc.fn(key)["readyReplicas"] == 1
    # Warm now: the next call goes straight through, on the same replica.
    r2 = loc.http.post(f"{loc.run_url}/{key}/test?x=1", json={"n": 2})
    assert r2.status_code == 200 and r2.headers["x-app-port"] == r.headers["x-app-port"]
    metrics = loc.http.get(f"{loc.admin_url}/metrics").text
    assert "fal_cold_start_seconds_count 1" in metrics
    assert 'fal_gateway_requests_total{function="default/sync0",kind="sync"} 2' in metrics
    assert 'fal_gateway_requests_total{function="default/sync0",kind="queue"}' not in metrics
    assert 'fal_gateway_requests_total{function="default/unused"' not in metrics


def test_nine_slow_requests_reach_exactly_three_replicas(make_local):
    loc = make_local([function("burst", keepAlive=2, maxReplicas=3, maxConcurrency=1)])
    key = "default/burst"
    ids = [loc.submit_ok(key, "slow", {"seconds": 1.5}) for _ in range(9)]
    most = 0
    done: set[str] = set()
    deadline = time.monotonic() + 90
    while len(done) < 9:
        assert time.monotonic() < deadline, f"not done: {len(done)}/9\n{loc.log_tail()}"
        most = max(most, len(loc.processes(key)))
        for rid in ids:
            if rid not in done and loc.status(key, rid).json()["status"] == "COMPLETED":
                done.add(rid)
        time.sleep(0.05)
    assert most == 3, f"peak replica processes {most}"
    ports = {loc.result(key, rid).headers["x-app-port"] for rid in ids}
    assert len(ports) == 3, ports
    for rid in ids:
        assert loc.result(key, rid).status_code == 200
    loc.wait_processes(key, 0, timeout=30)


def test_min_replicas_one_never_goes_to_zero(make_local):
    loc = make_local([function("warm", keepAlive=1, minReplicas=1, maxReplicas=2)])
    key = "default/warm"
    loc.wait_ready(key, 1)
    rid = loc.submit_ok(key, "test", {"a": 1})
    loc.wait_completed(key, rid)
    stays(lambda: loc.fn(key)["readyReplicas"] == 1, 4)


def test_cancel_at_zero_completes_at_once(make_local):
    # An app that takes 5 s to start: the request is still queued when cancelled.
    slow_start = ["sh", "-c", f"sleep 5; exec {' '.join(function('x')['spec']['command'])}"]
    loc = make_local([function("lazy", command=slow_start, keepAlive=1)])
    key = "default/lazy"
    rid = loc.submit_ok(key, "test", {})
    c = loc.http.put(f"{loc.queue_url}/{key}/requests/{rid}/cancel")
    assert c.status_code == 202 and c.json()["status"] == "CANCELLATION_REQUESTED"
    st = loc.status(key, rid)
    assert st.status_code == 200 and st.json()["status"] == "COMPLETED", st.text
    assert loc.result(key, rid).status_code == 499
    # Nothing left to do: back to zero (the replica that was starting is stopped).
    loc.wait_processes(key, 0, timeout=30)


def test_webhook_after_cold_start_arrives_signed(make_local):
    loc = make_local([function("hooked", keepAlive=1)])
    key = "default/hooked"
    rcv = WebhookReceiver(f"{loc.run_url}/.well-known/jwks.json").start()
    try:
        rid = loc.submit_ok(key, "test", {"w": 1}, params={"fal_webhook": rcv.url("/hook")})
        d = wait_until(lambda: rcv.deliveries[0] if rcv.deliveries else None, timeout=60,
                       what="the webhook")
        assert d.verified, d.verify_error
        assert d.json["request_id"] == rid and d.json["status"] == "OK"
        assert d.json["payload"]["input"] == {"w": 1}
        assert d.headers["x-fal-webhook-user-id"] == "default"
    finally:
        rcv.stop()


def test_webhook_retries_go_on_at_zero(make_local):
    """The receiver is down while the replica lives: the gateway's outbox loop keeps
    retrying after the function is back at zero."""
    loc = make_local([function("retry", keepAlive=0)])
    key = "default/retry"
    rcv = WebhookReceiver(f"{loc.run_url}/.well-known/jwks.json")
    rid = loc.submit_ok(key, "test", {}, params={"fal_webhook": rcv.url("/late")})
    loc.wait_completed(key, rid)
    loc.wait_processes(key, 0, timeout=30)
    rcv.start()
    try:
        d = wait_until(lambda: rcv.deliveries[0] if rcv.deliveries else None, timeout=60,
                       what="the webhook, delivered by the gateway at zero replicas")
        assert d.verified and d.json["request_id"] == rid
        assert loc.processes(key) == []
    finally:
        rcv.stop()


def test_kill9_of_a_replica_mid_request_completes_on_another(make_local):
    loc = make_local([function("crash", keepAlive=5, maxReplicas=1)])
    key = "default/crash"
    rid = loc.submit_ok(key, "slow", {"seconds": 2})
    wait_until(lambda: loc.status(key, rid).json()["status"] == "IN_PROGRESS", timeout=30,
               what="the request to start")
    [victim] = loc.processes(key)
    pids = [victim["pid"], *descendants(victim["pid"])]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    st = loc.wait_completed(key, rid, timeout=60)
    assert "error" not in st, st
    r = loc.result(key, rid)
    assert r.status_code == 200, r.text
    [now] = loc.processes(key)
    assert now["pid"] != victim["pid"]


def test_redis_restart(make_local, tmp_path):
    server = RedisServer(tmp_path / "own-redis").start()
    loc = make_local([function("durable", keepAlive=30, minReplicas=1)], start=False)
    loc.redis = server  # its own Redis, to stop and start
    loc.start()
    key = "default/durable"
    loc.wait_ready(key, 1)
    before = loc.submit_ok(key, "slow", {"seconds": 1})
    server.stop()
    r = loc.submit(key, "test", {})
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    assert "detail" in r.json()
    server.start()
    after = loc.submit_ok(key, "test", {"after": True})
    for rid in (before, after):
        st = loc.wait_completed(key, rid, timeout=60)
        assert "error" not in st, st
    assert loc.result(key, after).json()["input"] == {"after": True}
    server.close()


def test_sigterm_drains_and_leaves_no_process(make_local):
    loc = make_local([function("bye", keepAlive=30, minReplicas=1, maxReplicas=2)])
    key = "default/bye"
    loc.wait_ready(key, 1)
    rid = loc.submit_ok(key, "slow", {"seconds": 1})
    wait_until(lambda: loc.status(key, rid).json()["status"] == "IN_PROGRESS", timeout=30,
               what="the request to start")
    tree = descendants(loc.proc.pid)
    assert tree, "replica processes expected"
    code = loc.terminate(timeout=60)
    assert code == 0, loc.log_tail()
    wait_until(lambda: not any(alive(p) for p in tree), timeout=10, what="every replica process to exit")
    # The running request was finished (drain), not lost.
    loc2 = loc.__class__(loc.workdir / "again", loc.redis, [function("bye", keepAlive=30)])
    loc2.start()
    try:
        st = loc2.wait_completed(key, rid, timeout=30)
        assert "error" not in st
    finally:
        loc2.close()


def test_npm_client_through_the_gateway(make_local):
    js = REPO / "tests" / "js"
    if not (js / "node_modules" / "@fal-ai" / "client").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `npm ci --prefix tests/js` (scripts/test.sh does)")
    node = shutil.which("node")
    assert node, "node is needed for the npm client test"
    loc = make_local([function("js-app", "me", keepAlive=2, maxReplicas=2, maxConcurrency=4)])
    proc = subprocess.run([node, str(js / "client_check.mjs"), loc.queue_url, loc.run_url],
                          capture_output=True, text=True, timeout=150, cwd=str(js))
    assert proc.returncode == 0, proc.stdout + proc.stderr + loc.log_tail()
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["streaming"]["input"] == {"x": 1}
    assert out["status"] == "COMPLETED"
    assert out["result"]["path"] == "/echo" and out["result"]["json"] == {"y": 2}
    assert out["cancelled"]["status"] == "COMPLETED"


def test_gateway_addressing_and_errors(make_local):
    loc = make_local([function("addr", keepAlive=5, minReplicas=1)], "--domain", "fal.test")
    key = "default/addr"
    loc.wait_ready(key, 1)
    h = loc.http
    # Unknown function and bad names: 404 JSON naming them.
    r = h.post(f"{loc.queue_url}/default/nope", json={})
    assert r.status_code == 404 and "default/nope" in r.json()["detail"]
    r = h.post(f"{loc.run_url}/default/nope/test", json={})
    assert r.status_code == 404 and "default/nope" in r.json()["detail"]
    for bad in ("/Default/addr", "/default/a..b/x", "/default/%7Bx%7D/test"):
        r = h.post(f"{loc.queue_url}{bad}", json={})
        assert r.status_code == 404 and "detail" in r.json(), (bad, r.text)
    # Generations A and B under /{namespace}/{name} on the run host.
    r = h.post(f"{loc.run_url}/{key}/fal/queue/submit/test", json={"gen": "a"})
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    assert r.json()["status_url"].startswith(f"{loc.run_url}/{key}/fal/queue/requests/{rid}")
    got = wait_until(lambda: (lambda x: x if x.status_code == 200 else None)(
        h.get(f"{loc.run_url}/{key}/fal/queue/{rid}/get")), timeout=30, what="gen A result")
    assert got.json()["input"] == {"gen": "a"}
    st = h.get(f"{loc.run_url}/{key}/fal/queue/requests/{rid}/status")
    assert st.status_code == 200 and st.json()["status"] == "COMPLETED"
    # Host routing: {name}.{namespace}.{domain} with the seed's unprefixed paths.
    host = {"host": "addr.default.fal.test"}
    r = h.post(f"{loc.run_url}/fal/queue/submit/test", json={"host": 1}, headers=host)
    assert r.status_code == 200, r.text
    rid2 = r.json()["request_id"]
    loc.wait_completed(key, rid2)
    r = h.post(f"{loc.run_url}/test", json={"direct": 1}, headers=host)
    assert r.status_code == 200 and r.json()["input"] == {"direct": 1}
    # JWKS on both listeners.
    for base in (loc.run_url, loc.queue_url):
        assert h.get(f"{base}/.well-known/jwks.json").json()["keys"][0]["crv"] == "Ed25519"


def test_cold_start_timeout_is_a_json_504(make_local):
    never = [os.environ.get("PYTHON", "python3"), "-c", "import time; time.sleep(600)"]
    loc = make_local([function("stuck", command=never)], "--cold-start-timeout", "1")
    r = loc.http.post(f"{loc.run_url}/default/stuck/test", json={})
    assert r.status_code == 504, r.text
    assert r.json()["error_type"] == "startup_timeout"
    assert "default/stuck" in r.json()["detail"]
    # A caller's own start deadline, shorter than the cold-start timeout: a user timeout.
    r = loc.http.post(f"{loc.run_url}/default/stuck/test", json={},
                      headers={"x-fal-request-timeout": "0.3"})
    assert r.status_code == 504 and r.headers["x-fal-request-timeout-type"] == "user"


def test_concurrent_sync_calls_wait_for_slots(make_local):
    """maxConcurrency 1, maxReplicas 1: concurrent sync calls are held and served one
    at a time, none refused."""
    loc = make_local([function("serial", keepAlive=5, maxReplicas=1, maxConcurrency=1)])
    key = "default/serial"
    results = []

    def call(i):
        r = httpx.post(f"{loc.run_url}/{key}/slow", json={"seconds": 0.3}, timeout=60)
        results.append(r.status_code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert len(loc.processes(key)) == 1


def test_idempotency_key_through_the_gateway_at_zero(make_local, fal):
    """Retried submits with one Idempotency-Key, concurrent, while the function is at
    zero: one request id, the app runs it once (its own counter, read with a sync call
    through the gateway while the replica is still warm)."""
    loc = make_local([function("idem", keepAlive=30)])
    key = "default/idem"
    counter = f"idem-{os.getpid()}-{time.monotonic_ns()}"
    idem = f"key-{counter}"
    out: list = []

    def submit():
        with httpx.Client(timeout=30) as c:
            out.append(c.post(f"{loc.queue_url}/{key}/flaky", params={"key": counter, "fail": "0"},
                              json={"n": 1}, headers={"Idempotency-Key": idem}))

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    ids = {r.json()["request_id"] for r in out}
    assert len(ids) == 1, ids
    assert sum(1 for r in out if "idempotent-replayed" not in r.headers) == 1
    [rid] = ids
    # The official client's headers= carries the key too.
    handle = fal(loc).submit(f"{key}/flaky?key={counter}&fail=0", arguments={"n": 1},
                             headers={"Idempotency-Key": idem})
    assert handle.request_id == rid
    loc.wait_completed(key, rid)
    other = loc.submit(key, "flaky", {"n": 2}, headers={"Idempotency-Key": idem},
                       params={"key": counter, "fail": "0"})
    assert other.status_code == 422, other.text
    calls = httpx.get(f"{loc.run_url}/{key}/calls", params={"key": counter}, timeout=30)
    assert calls.status_code == 200, calls.text
    assert calls.json()["calls"] == 1


def test_a_replica_whose_app_restarts_leaves_routing_until_it_is_back(make_local, tmp_path):
    """The replica's sidecar supervises its app: while the app restarts, the gateway
    routes no sync call to it (held instead of answered 503), and sends the held call
    once the app is back."""
    state = tmp_path / "crash-app"
    state.mkdir()
    cmd = [sys.executable, "-u", "tests/e2e/crash_app.py"]
    loc = make_local([function("crashy", command=cmd, minReplicas=1, keepAlive=30,
                               env=[{"name": "CRASH_APP_DIR", "value": str(state)}])])
    key = "default/crashy"
    loc.wait_ready(key, 1)
    (state / "hold").touch()  # the restart waits before listening until the test says
    with httpx.Client(timeout=60) as c:
        c.post(f"{loc.run_url}/{key}/crash", json={})  # the app dies (the answer is an error)
    wait_until(lambda: [p["phase"] for p in loc.processes(key)] == ["restarting"], timeout=30,
               what="the replica to leave routing while its app restarts")
    out: list = []
    t = threading.Thread(target=lambda: out.append(
        httpx.post(f"{loc.run_url}/{key}/ok", json={}, timeout=60)))
    t.start()
    stays(lambda: not out, 1.5)  # held, not answered 503
    (state / "hold").unlink()
    t.join(60)
    assert out and out[0].status_code == 200, out and out[0].text
    assert out[0].json()["starts"] == 2
    assert [p["phase"] for p in loc.processes(key)] == ["ready"]


def test_scale_to_zero_on_a_redis_cluster(tmp_path):
    """The gateway, the autoscaler and the replicas on a 3-master Redis Cluster: a
    submit at zero wakes the function (pub/sub across nodes), it completes, a sync call
    is served, and keepAlive takes the function back to zero."""
    from local_proc import Local
    from redis_ha_fixture import RedisCluster

    cluster = RedisCluster(tmp_path / "cluster", masters=3).start()
    loc = Local(tmp_path / "local", cluster, [function("sharded", keepAlive=2)])
    try:
        loc.start()
        key = "default/sharded"
        assert loc.processes(key) == []
        rid = loc.submit_ok(key, "test", {"prompt": "on a cluster"})
        st = loc.wait_completed(key, rid)
        assert "error" not in st, st
        assert loc.result(key, rid).json()["input"] == {"prompt": "on a cluster"}
        r = loc.http.post(f"{loc.run_url}/{key}/test", json={"sync": True})
        assert r.status_code == 200 and r.json()["input"] == {"sync": True}, r.text
        loc.wait_processes(key, 0, timeout=30)
        assert loc.status(key, rid).json()["status"] == "COMPLETED"
    finally:
        loc.close()
        cluster.close()


def test_replicas_follow_the_gateways_webhook_schedule_and_allow_list(make_local):
    """A webhook is retried by whichever process takes it from the shared outbox (the
    gateway or a replica): every replica gets local's --webhook-retry-delays and
    --webhook-allow. (A 30-minute soak found a webhook retried on the replicas' default
    15 s … 900 s schedule next to the gateway's, whose 300 s steps kept meeting a
    receiver that was down every 150 s.)"""
    loc = make_local([function("hooks", minReplicas=1)], "--webhook-allow", "203.0.113.7")
    (rep,) = loc.wait_processes("default/hooks", 1)
    argv = Path(f"/proc/{rep['pid']}/cmdline").read_bytes().split(b"\0")
    args = [a.decode() for a in argv]
    assert args[args.index("--webhook-retry-delays") + 1] == "0.3,0.5,1,1,2", args
    assert args[args.index("--webhook-allow") + 1] == "203.0.113.7", args
