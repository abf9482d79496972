"""Issue 17: a healthy store never refuses, counted from readiness (no warm-up).

For every store kind — embedded; `redis://` (a primary with one replica);
`redis+cluster://` (3 primaries x 2 replicas); `redis+sentinel://` (3 sentinels, one
primary + 2 replicas) — with and without `--store-replicas 1` (Redis kinds): a fresh
topology with Redis' default `repl-diskless-sync-delay` (5 s), *not* waited on to settle
(replicas attached but not yet synced, sentinels still discovering each other: what a
sidecar started together with its Redis meets), and a fresh `fal-sidecar run` started
at once. The moment its `/readyz` says ready: N submits
one after another, then N with 32 in flight (N = STORE_READY_REQUESTS, default 1000).
Every answer is 200, every request completes, the app runs each exactly once.

Before issue 17, `/readyz` was a read (`load`), so it said ready while a fresh primary
had no script cached (the first `EVALSHA` with `WAIT` took two WAIT bounds), while the
replicas were not yet streamed to (a `WAIT` took up to a second or was refused), and
through Sentinel with a 500 ms response timeout below the WAIT bound.

Times go to stdout (`STORE-READY-MEASURE ...`, run with -s), never asserted.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from helpers import wait_until
from redis_ha_fixture import app_cmd
from store_load import (
    assert_all_accepted,
    assert_completed,
    assert_each_ran_once,
    drive,
    measure,
    start_store,
)

N = int(os.environ.get("STORE_READY_REQUESTS", "1000"))

CASES = [
    pytest.param("embedded", 0, id="embedded"),
    pytest.param("redis", 0, id="redis"),
    pytest.param("redis", 1, id="redis-store-replicas-1"),
    pytest.param("cluster", 0, id="cluster3x2"),
    pytest.param("cluster", 1, id="cluster3x2-store-replicas-1"),
    pytest.param("sentinel", 0, id="sentinel3-1+2"),
    pytest.param("sentinel", 1, id="sentinel3-1+2-store-replicas-1"),
]


def wait_ready(sc, timeout: float = 60.0) -> float:
    """Poll /readyz every 20 ms until 200; the seconds it took. Every non-200 answer
    must be a JSON detail."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        assert sc.running, f"the sidecar exited before it was ready\n{sc.log_tail()}"
        try:
            r = sc.http.get(f"{sc.admin_url}/readyz", timeout=3)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if r.status_code == 200:
                return time.monotonic() - start
            assert r.status_code == 503, r.text
            last = r.json()["detail"]
        time.sleep(0.02)
    raise AssertionError(f"never ready within {timeout:g}s; last: {last}\n{sc.log_tail()}")


@pytest.mark.parametrize("kind, replicas", CASES)
def test_no_refusal_counted_from_readiness(kind, replicas, tmp_path, make_sidecar, sidecar_help):
    if replicas and "--store-replicas" not in sidecar_help:
        pytest.skip("this fal-sidecar has no --store-replicas")
    url, topology = start_store(kind, tmp_path)
    try:
        seen = tmp_path / "seen.log"
        args = ["--max-concurrency", "8"]
        if url:
            args += ["--store", url, "--function", "default/app"]
        if replicas:
            args += ["--store-replicas", str(replicas)]
        sc = make_sidecar(*args, start=False, app_cmd=app_cmd(seen), name=f"sidecar-{kind}")
        sc.start(wait=False)
        ready_after = wait_ready(sc)
        t0 = time.monotonic()
        base = f"{sc.queue_url}/test/app"
        answers, timing = drive(base, N, t0)
        ids = assert_all_accepted(answers)
        ran = assert_each_ran_once([seen], ids, timeout=120)
        assert_completed(base, ids)
        measure(f"sidecar {kind} store-replicas={replicas}: ready {ready_after:.2f}s after start; "
                f"{N} sequential submits in {timing['sequential']:.1f}s, {N} with 32 in flight in "
                f"{timing['parallel']:.1f}s, all accepted; every one ran once ({ran:.1f}s after the last "
                f"submit); test {time.monotonic() - t0 + ready_after:.1f}s after the sidecar started")
    finally:
        if topology is not None:
            topology.close()


def test_not_ready_while_the_replicas_cannot_confirm(tmp_path, make_sidecar, sidecar_help):
    """Readiness follows the store both ways: with `--store-replicas 1`, a replica that
    stops (SIGSTOP, its link cut) takes the sidecar out of readiness, with a detail that
    says what to check; once it is back, the sidecar is ready again and takes a submit."""
    if "--store-replicas" not in sidecar_help:
        pytest.skip("this fal-sidecar has no --store-replicas")
    url, topology = start_store("redis", tmp_path)
    try:
        seen = tmp_path / "seen.log"
        sc = make_sidecar("--store", url, "--function", "default/app", "--store-replicas", "1",
                          start=False, app_cmd=app_cmd(seen))
        sc.start(wait=False)
        wait_ready(sc)
        primary, replica = topology.data_nodes
        replica.pause()
        try:
            primary.cmd("CLIENT", "KILL", "TYPE", "replica")

            def not_ready():
                r = sc.http.get(f"{sc.admin_url}/readyz", timeout=3)
                return r if r.status_code == 503 else None

            r = wait_until(not_ready, timeout=30, interval=0.1, what="/readyz to fail without a replica")
            body = r.json()
            assert body["error_type"] == "store_unavailable", body
            assert "0 of 1 replicas confirmed a probe write" in body["detail"], body
            assert "INFO replication" in body["detail"], body
        finally:
            replica.resume()
        back = wait_ready(sc)
        rid = sc.submit_ok("test", {"back": True})["request_id"]
        assert sc.wait_result(rid, timeout=30).json()["input"] == {"back": True}
        measure(f"sidecar redis store-replicas=1: not ready while the replica was stopped; ready again "
                f"{back:.2f}s after it resumed")
    finally:
        topology.close()
