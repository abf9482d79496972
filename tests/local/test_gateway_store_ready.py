"""Issue 17 through the gateway: `fal-operator local` never refuses a submit once its
`/readyz` says ready, on every shared store kind.

`redis://` (a primary and one replica), `redis+cluster://` (3 primaries x 2 replicas),
`redis+sentinel://` (3 sentinels, one primary + 2 replicas), each with and without
`--store-replicas 1`: a fresh topology with Redis' default sync delay, not waited on
(tests/e2e/store_load.py `start_store`), `fal-operator local` started at once with one
function at zero replicas. The moment the gateway's `/readyz` says ready (it probes
every primary with a write, confirmed by the replicas), N submits one after another and
N with 32 in flight go to the queue host (N = STORE_READY_REQUESTS, default 1000); every
answer is 200, the replicas local starts run every request exactly once, and every one
completes.

Times go to stdout (`STORE-READY-MEASURE ...`, run with -s), never asserted.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import httpx
import pytest

from local_proc import Local, function
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
    pytest.param("redis", 0, id="redis"),
    pytest.param("redis", 1, id="redis-store-replicas-1"),
    pytest.param("cluster", 0, id="cluster3x2"),
    pytest.param("cluster", 1, id="cluster3x2-store-replicas-1"),
    pytest.param("sentinel", 0, id="sentinel3-1+2"),
    pytest.param("sentinel", 1, id="sentinel3-1+2-store-replicas-1"),
]


def wait_ready(loc: Local, timeout: float = 60.0) -> float:
    """Poll the gateway's /readyz every 20 ms until 200; the seconds it took. Every
    other answer must be a 503 with a JSON detail."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        if loc.proc.poll() is not None:
            raise AssertionError(f"fal-operator local exited with {loc.proc.returncode}:\n{loc.log_tail()}")
        try:
            r = loc.http.get(f"{loc.admin_url}/readyz", timeout=3)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if r.status_code == 200:
                return time.monotonic() - start
            assert r.status_code == 503, r.text
            last = r.json()["detail"]
        time.sleep(0.02)
    raise AssertionError(f"local never ready within {timeout:g}s; last: {last}\n{loc.log_tail()}")


@pytest.mark.parametrize("kind, replicas", CASES)
def test_gateway_never_refuses_from_readiness(kind, replicas, tmp_path):
    url, topology = start_store(kind, tmp_path)
    loc = None
    try:
        seen = tmp_path / "seen.log"
        fn = function("ready", command=app_cmd(seen), minReplicas=0, maxReplicas=2,
                      maxConcurrency=8, keepAlive=60)
        extra = ["--store-replicas", str(replicas)] if replicas else []
        loc = Local(tmp_path / "local", SimpleNamespace(url=url), [fn], *extra)
        started = time.monotonic()
        loc.start(wait=False)
        wait_ready(loc)
        ready_after = time.monotonic() - started
        t0 = time.monotonic()
        base = f"{loc.queue_url}/default/ready"
        answers, timing = drive(base, N, t0)
        ids = assert_all_accepted(answers)
        ran = assert_each_ran_once([seen], ids, timeout=150)
        assert_completed(base, ids)
        measure(f"local gateway {kind} store-replicas={replicas}: ready {ready_after:.2f}s after start; "
                f"{N} sequential submits in {timing['sequential']:.1f}s, {N} with 32 in flight in "
                f"{timing['parallel']:.1f}s, all accepted; every one ran once ({ran:.1f}s after the last "
                f"submit); test {time.monotonic() - started:.1f}s after local started")
    except BaseException:
        if loc is not None:
            print(f"--- fal-operator local log ({loc.log_path}) ---\n{loc.log_tail(300)}")
        raise
    finally:
        if loc is not None:
            loc.close()
        if topology is not None:
            topology.close()
