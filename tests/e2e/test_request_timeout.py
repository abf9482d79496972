"""`--request-timeout` (FalFunction `requestTimeout`): the longest one request may run
in the app, for queued requests (504 result, cancel sent to the app) and direct calls."""

from __future__ import annotations

import httpx


def test_queued_request_past_the_request_timeout(make_sidecar):
    sc = make_sidecar("--request-timeout", "0.5")
    rid = sc.submit_ok("slow", {"seconds": 5})["request_id"]
    st = sc.wait_completed(rid, timeout=15)
    assert st["error_type"] == "request_timeout", st
    res = sc.result(rid)
    assert res.status_code == 504
    assert res.headers["x-fal-error-type"] == "request_timeout"
    assert "request timeout" in res.json()["detail"]
    # The app was told to stop.
    sc.wait_app_saw("/slow/cancel", rid)
    # A quick request still runs normally afterwards.
    ok = sc.submit_ok("test", {"n": 1})["request_id"]
    sc.wait_completed(ok, timeout=15)
    assert sc.result(ok).status_code == 200


def test_direct_call_past_the_request_timeout(make_sidecar):
    sc = make_sidecar("--request-timeout", "0.5")
    r = httpx.post(f"{sc.run_url}/slow", json={"seconds": 5}, timeout=10)
    assert r.status_code == 504
    assert r.json()["error_type"] == "request_timeout"
    assert r.headers.get("connection") == "close"
    assert httpx.post(f"{sc.run_url}/test", json={}, timeout=10).status_code == 200
