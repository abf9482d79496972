"""The Redis store backend end to end: several `fal-sidecar run` replicas share one
queue in a real `redis-server` (AOF on), on loopback.

REDIS_E2E_N sets the size of the shared-queue load (default 10000, as the issue asks; the benchmark uses
10000). Needs `redis-server` (REDIS_SERVER or PATH).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers import HTTP_TIMEOUT, wait_until
from redis_fixture import REDIS_SERVER, RedisServer, app_cmd, redis_args, signing_key

N = int(os.environ.get("REDIS_E2E_N", "10000"))

pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS_SERVER), reason=f"redis-server not found ({REDIS_SERVER})"
)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.close()


@pytest.fixture
def replicas(make_sidecar, redis_server, tmp_path):
    """Factory: n sidecars on the shared Redis queue (same function, same webhook key)."""
    key = signing_key(tmp_path / "webhook.key")

    def factory(n: int, *extra: str, names: str = "replica") -> list:
        return [
            make_sidecar(
                *redis_args(redis_server, "--signing-key", str(key), *extra),
                name=f"{names}{i}",
                app_cmd=app_cmd(),
            )
            for i in range(n)
        ]

    return factory


def completed_ok(sidecars) -> int:
    """Sum of fal_queue_completed_total{outcome="ok"} over the replicas."""
    total = 0
    for sc in sidecars:
        text = sc.http.get(f"{sc.admin_url}/metrics").text
        for m in re.finditer(r'^fal_queue_completed_total\{outcome="ok"\} (\d+)', text, re.M):
            total += int(m.group(1))
    return total


def test_three_replicas_share_one_queue(replicas):
    scs = replicas(3, "--max-concurrency", "4")
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=HTTP_TIMEOUT)
        return local.c

    def submit(i: int) -> tuple[int, str, int]:
        sc = scs[i % 3]
        r = client().post(f"{sc.queue_url}/test/app/test", json={"i": i})
        assert r.status_code == 200, r.text
        body = r.json()
        return i, body["request_id"], body.get("queue_position", 0)

    # Occupy every worker (3 replicas x 4) so the submits below queue up whatever the
    # speed of the app; they are cancelled once everything is submitted.
    blockers = [scs[i % 3].submit_ok("slow", {"seconds": 60})["request_id"] for i in range(12)]
    for i, rid in enumerate(blockers):
        scs[i % 3].wait_status(rid, "IN_PROGRESS", timeout=15)

    # Sample the positions of the last requests as the queue drains, from every replica.
    with ThreadPoolExecutor(16) as pool:
        submitted = list(pool.map(submit, range(N)))
    ids = {rid: i for i, rid, _ in submitted}
    assert len(ids) == N, "request ids are unique"

    sample = [rid for _, rid, _ in submitted[-40:]]
    positions: dict[str, list[int]] = {rid: [] for rid in sample}
    pending = set(sample)
    for n, rid in enumerate(sample):
        body = scs[n % 3].status(rid).json()
        assert body["status"] == "IN_QUEUE", body
        positions[rid].append(body["queue_position"])
    for i, rid in enumerate(blockers):
        assert scs[i % 3].cancel(rid).status_code == 202
    deadline = time.monotonic() + 60
    turn = 0
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            sc = scs[turn % 3]
            turn += 1
            body = sc.status(rid).json()
            if body["status"] == "IN_QUEUE":
                positions[rid].append(body["queue_position"])
            elif body["status"] == "COMPLETED":
                pending.discard(rid)
    assert not pending, f"{len(pending)} sampled requests did not complete"
    for rid, seen in positions.items():
        assert seen == sorted(seen, reverse=True), f"position went up for {rid}: {seen}"
    assert any(positions.values()), "no request was ever seen waiting (the queue never built up)"

    # Everything completes, each with its own input as the result.
    def fetch(rid: str) -> tuple[str, dict]:
        sc = scs[hash(rid) % 3]
        c = client()
        r = wait_until(
            lambda: (lambda s: s if s.json()["status"] == "COMPLETED" else None)(
                c.get(sc.req_url(rid) + "/status")
            ),
            timeout=60,
            interval=0.1,
            what=f"{rid} to complete",
        )
        assert r.status_code == 200
        res = c.get(sc.req_url(rid))
        assert res.status_code == 200, res.text
        return rid, res.json()

    with ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(fetch, ids))
    assert {rid: body["input"]["i"] for rid, body in results.items()} == ids
    # Each request ran once: the ok completions over all replicas add up to N (the
    # cancelled blockers ended with 499, not ok).
    for rid in blockers:
        assert scs[0].wait_completed(rid, timeout=30)["error_type"] == "request_cancelled"
    assert wait_until(lambda: completed_ok(scs) == N or None, timeout=5, what="metrics") is True
    # The load spread over the replicas (every one did some of the work).
    per_replica = [completed_ok([sc]) for sc in scs]
    assert all(n > 0 for n in per_replica), per_replica


def test_kill9_replica_jobs_complete_elsewhere(replicas, make_receiver):
    a, b = replicas(2, "--max-concurrency", "2", "--lease", "1")
    rcv = make_receiver(b)
    rids = [
        a.submit_ok("slow", {"seconds": 1.5}, webhook=rcv.url("/moved"))["request_id"]
        for _ in range(4)
    ]
    # Wait until A's app is running some of them, then crash A (sidecar and app).
    on_a = wait_until(
        lambda: [e["x-fal-request-id"] for e in a.app_seen() if e["path"] == "/slow"],
        timeout=10,
        what="replica A to run a job",
    )
    a.kill9()
    for rid in rids:
        r = b.wait_result(rid, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"slept": 1.5}
        assert r.headers.get("x-app-port") == str(b.app_port), "completed by the survivor"
        assert b.status(rid).json()["status"] == "COMPLETED"
    # The crashed replica's jobs were run again by B.
    seen_b = {e["x-fal-request-id"] for e in b.app_seen() if e["path"] == "/slow"}
    assert set(on_a) <= seen_b, (on_a, seen_b)
    for rid in rids:
        d = rcv.wait_for(rid, timeout=20)
        assert d.json["status"] == "OK" and d.json["request_id"] == rid
        assert d.json["payload"] == {"slept": 1.5}
        assert all(x.json["request_id"] == rid for x in rcv.for_request(rid))


def test_stopped_replica_late_completion_is_rejected(replicas):
    (a,) = replicas(1, "--max-concurrency", "1", "--lease", "1", names="stopped")
    rid = a.submit_ok("slow", {"seconds": 1.0})["request_id"]
    a.wait_app_saw("/slow", rid)
    os.kill(a.proc.pid, signal.SIGSTOP)  # the sidecar only: its app answers meanwhile
    try:
        (b,) = replicas(1, "--max-concurrency", "1", "--lease", "1", names="survivor")
        r = b.wait_result(rid, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers.get("x-app-port") == str(b.app_port)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # A wakes up with its (old) app answer and tries to store it: rejected by the token;
    # or it sees first that its lease ran out meanwhile and gives the run up.
    wait_until(
        lambda: any(m in a.log_text() for m in ("result dropped", "lease lost", "gave this run up")),
        timeout=10,
        what="the stale replica to notice",
    )
    for sc in (a, b):
        r = sc.result(rid)
        assert r.status_code == 200
        assert r.headers.get("x-app-port") == str(b.app_port), "the first result stays"
    status = b.status(rid).json()
    assert status["status"] == "COMPLETED"


def test_redis_restart_mid_load(replicas, redis_server):
    scs = replicas(2, "--max-concurrency", "2", "--lease", "2")
    acked = []
    for i in range(120):
        acked.append(scs[i % 2].submit_ok("slow", {"seconds": 0.05, "i": i})["request_id"])
    redis_server.stop()
    try:
        for sc in scs:
            r = sc.submit("test", {"during": "outage"})
            assert r.status_code == 503, r.text
            assert r.headers.get("retry-after"), r.headers
            body = r.json()
            assert isinstance(body.get("detail"), str) and "unavailable" in body["detail"], body
        # status is unavailable too (not a false 404)
        r = scs[0].status(acked[-1])
        assert r.status_code == 503, r.text
        time.sleep(0.5)
    finally:
        redis_server.start()
    for sc in scs:
        assert sc.running, f"{sc.name} exited while Redis was down"
        # the push channel (workers' wake-ups, cancels) comes back by itself
        wait_until(lambda: "redis subscription restored" in sc.log_text(), timeout=10,
                   what=f"{sc.name} to resubscribe")
    for i, rid in enumerate(acked):
        r = scs[i % 2].wait_result(rid, timeout=40)
        assert r.status_code == 200, r.text
        assert r.json() == {"slept": 0.05}
    # And the queue works normally again.
    rid = scs[0].submit_ok("test", {"after": True})["request_id"]
    assert scs[1].wait_result(rid).json()["input"] == {"after": True}


def test_fal_client_on_redis_backend(replicas, monkeypatch):
    import fal_client
    import fal_client.client as fal_client_module

    (sc,) = replicas(1, "--max-concurrency", "1", names="fal-client")
    monkeypatch.setenv("FAL_KEY", "e2e-key-id:e2e-key-secret")
    monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{sc.queue_url}/")
    monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{sc.run_url}/")
    client = fal_client.SyncClient()
    try:
        handle = client.submit("test/app", {"lines": 3}, path="logs")
        events = list(handle.iter_events(with_logs=True, interval=0.05))
        assert isinstance(events[-1], fal_client.Completed), events
        logs = [item["message"].rstrip("\n") for item in events[-1].logs or []]
        assert "log line 0" in logs and "log line 2" in logs, logs
        assert handle.get() == {"printed": 3}
    finally:
        client._client.close()
