"""Admin `/drain` (the pod's preStop hook): stop claiming, fail readiness, wait for the
running request, keep answering the queue API; what is still queued survives."""

from __future__ import annotations

import httpx


def test_drain_waits_for_running_and_leaves_queued(make_sidecar):
    sc = make_sidecar("--max-concurrency", "1")
    busy = sc.submit_ok("slow", {"seconds": 1.5})["request_id"]
    sc.wait_app_saw("/slow", busy)
    queued = sc.submit_ok("test", {"n": 2})["request_id"]

    r = httpx.get(f"{sc.admin_url}/drain", timeout=30)
    assert r.status_code == 200 and r.json() == {"drained": True, "in_flight": 0}
    # The running request finished; the queued one was not claimed.
    assert sc.result(busy).status_code == 200
    st = sc.status(queued).json()
    assert st["status"] == "IN_QUEUE", st
    assert httpx.get(f"{sc.admin_url}/readyz").status_code == 503
    # The queue API still answers, and accepts submits (they wait for a replica).
    assert sc.submit_ok("test", {"n": 3})["request_id"]

    assert sc.terminate() == 0
    sc.start()
    assert sc.wait_result(queued, timeout=20).status_code == 200
