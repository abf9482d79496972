"""Queue semantics: positions and priority, start timeout, queue full, cancel, app-call retries."""

from __future__ import annotations

import pytest

from helpers import new_key, wait_until


def occupy(sc, seconds=20):
    """Start a /slow request and wait until the app is running it."""
    rid = sc.submit_ok("slow", {"seconds": seconds})["request_id"]
    sc.wait_app_saw("/slow", rid)
    sc.wait_status(rid, "IN_PROGRESS")
    return rid


# -- queue position and priority -------------------------------------------

def test_queue_position_zero_indexed_and_priority(serial_sidecar):
    sc = serial_sidecar
    busy = occupy(sc)
    low1 = sc.submit_ok("echo", {"n": "low1"}, headers={"X-Fal-Queue-Priority": "low"})
    norm1 = sc.submit_ok("echo", {"n": "norm1"}, headers={"X-Fal-Queue-Priority": "normal"})
    low2 = sc.submit_ok("echo", {"n": "low2"}, headers={"X-Fal-Queue-Priority": "low"})
    norm2 = sc.submit_ok("echo", {"n": "norm2"})  # default priority is normal
    assert low1["queue_position"] == 0  # 0-indexed: nothing ahead of it at submit time

    expected = {norm1["request_id"]: 0, norm2["request_id"]: 1, low1["request_id"]: 2, low2["request_id"]: 3}
    for rid, pos in expected.items():
        r = sc.status(rid)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "IN_QUEUE", body
        assert body["queue_position"] == pos, (rid, body, expected)

    r = sc.status(busy)
    assert r.json()["status"] == "IN_PROGRESS"
    assert "queue_position" not in r.json() or r.json()["queue_position"] in (None, 0)

    sc.cancel(busy)
    for rid in expected:
        sc.wait_completed(rid)
    order = [e["x-fal-request-id"] for e in sc.app_seen() if e["path"] == "/echo"]
    assert order == [norm1["request_id"], norm2["request_id"], low1["request_id"], low2["request_id"]], order


def test_queue_position_decreases(serial_sidecar):
    sc = serial_sidecar
    busy = occupy(sc)
    second_busy = sc.submit_ok("slow", {"seconds": 20})["request_id"]
    tail = sc.submit_ok("echo", {})["request_id"]
    assert sc.status(tail).json()["queue_position"] == 1
    sc.cancel(busy)
    sc.wait_app_saw("/slow", second_busy)
    wait_until(lambda: sc.status(tail).json().get("queue_position") == 0, timeout=5,
               what="queue_position to drop to 0")
    sc.cancel(second_busy)
    sc.wait_completed(tail)


# -- start timeout ------------------------------------------------------------

def test_start_timeout_expires_in_queue(serial_sidecar):
    sc = serial_sidecar
    busy = occupy(sc)
    rid = sc.submit_ok("echo", {"t": 1}, headers={"X-Fal-Request-Timeout": "1.0"})["request_id"]
    status = sc.wait_completed(rid, timeout=10)
    assert status.get("error"), status
    r = sc.result(rid)
    assert r.status_code == 504, r.text
    assert r.headers.get("x-fal-request-timeout-type") == "user"
    assert r.headers.get("x-fal-request-id") == rid
    body = r.json()
    assert body.get("detail")
    # a gateway-made error: error_type in body and X-Fal-Error-Type header
    assert body.get("error_type") in ("request_timeout", "startup_timeout"), body
    assert r.headers.get("x-fal-error-type") == body["error_type"]
    sc.cancel(busy)
    sc.wait_completed(busy)
    assert all(e["x-fal-request-id"] != rid for e in sc.app_seen()), "timed-out request reached the app"


def test_start_timeout_stops_once_processing_starts(sidecar):
    # the deadline covers queue wait only: a 1.5 s job with a 1 s start timeout succeeds
    rid = sidecar.submit_ok("slow", {"seconds": 1.5}, headers={"X-Fal-Request-Timeout": "1"})["request_id"]
    r = sidecar.wait_result(rid, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"slept": 1.5}


# -- queue full -----------------------------------------------------------------

def test_queue_full_429_with_retry_after(make_sidecar):
    sc = make_sidecar("--max-concurrency", "1", "--max-queue", "2")
    busy = occupy(sc)
    accepted = []
    rejected = None
    for i in range(4):
        r = sc.submit("echo", {"i": i})
        if r.status_code == 429:
            rejected = r
            break
        assert 200 <= r.status_code < 300, r.text
        accepted.append(r.json()["request_id"])
    assert rejected is not None, f"no 429 after {len(accepted)} queued submits with --max-queue 2"
    assert 1 <= len(accepted) <= 2, accepted
    assert rejected.headers.get("retry-after"), rejected.headers
    assert int(rejected.headers["retry-after"]) >= 0
    assert rejected.json().get("detail")
    # gen A and gen B submits are bounded by the same queue
    r = sc.http.post(f"{sc.run_url}/fal/queue/submit/echo", json={})
    assert r.status_code == 429 and r.headers.get("retry-after"), r.text
    # after draining, submits are accepted again
    sc.cancel(busy)
    for rid in accepted:
        sc.wait_completed(rid)
    r = sc.submit("echo", {})
    assert 200 <= r.status_code < 300, r.text


# -- cancel ---------------------------------------------------------------------

def test_cancel_queued(serial_sidecar):
    sc = serial_sidecar
    busy = occupy(sc)
    rid = sc.submit_ok("echo", {"c": 1})["request_id"]
    c = sc.cancel(rid)
    assert c.status_code == 202, c.text
    assert c.json()["status"] == "CANCELLATION_REQUESTED"
    assert c.headers.get("x-fal-request-id") == rid
    status = sc.wait_completed(rid, timeout=5)
    assert isinstance(status.get("error"), str) and status["error"], status
    r = sc.result(rid)
    assert r.status_code == 499, r.text
    sc.cancel(busy)
    sc.wait_completed(busy)
    assert all(e["x-fal-request-id"] != rid for e in sc.app_seen()), "cancelled request reached the app"


def test_cancel_running(sidecar):
    rid = occupy(sidecar, seconds=20)
    c = sidecar.cancel(rid)
    assert c.status_code == 202, c.text
    assert c.json()["status"] == "CANCELLATION_REQUESTED"
    entry = sidecar.wait_app_saw("/slow/cancel", rid)
    assert entry["method"] == "POST"
    status = sidecar.wait_completed(rid, timeout=10)
    r = sidecar.result(rid)
    assert r.status_code == 499, r.text
    assert r.json() == {"detail": "cancelled"}  # the app's own 499
    assert status["status"] == "COMPLETED"


def test_cancel_completed_and_unknown(sidecar):
    rid = sidecar.submit_ok("echo", {})["request_id"]
    sidecar.wait_completed(rid)
    c = sidecar.cancel(rid)
    assert c.status_code == 400, c.text
    assert c.json()["status"] == "ALREADY_COMPLETED"
    assert c.headers.get("x-fal-request-id") == rid
    assert sidecar.result(rid).status_code == 200  # result untouched
    c = sidecar.cancel("00000000-0000-4000-8000-000000000000")
    assert c.status_code == 404, c.text
    assert c.json()["status"] == "NOT_FOUND"
    # trailing slash
    c = sidecar.http.put(sidecar.req_url(rid) + "/cancel/")
    assert c.status_code == 400 and c.json()["status"] == "ALREADY_COMPLETED"


# -- retries of the app call --------------------------------------------------------

@pytest.mark.parametrize("status", [503, 504, 429])
def test_retryable_statuses_are_retried(sidecar, status):
    key = new_key(f"flaky{status}")
    rid = sidecar.submit_ok("flaky", {"key": key, "fail": 2, "status": status})["request_id"]
    r = sidecar.wait_result(rid, timeout=15)
    assert r.status_code == 200, r.text
    assert r.json() == {"calls": 3}
    assert sidecar.app_calls(key) == 3


@pytest.mark.parametrize("status", [500, 502, 400, 404, 422])
def test_non_retryable_statuses_called_once(sidecar, status):
    key = new_key(f"fail{status}")
    rid = sidecar.submit_ok("fail", {"key": key, "status": status})["request_id"]
    r = sidecar.wait_result(rid)
    assert r.status_code == status, r.text
    assert r.json() == {"detail": f"failing on purpose with {status}"}
    assert sidecar.app_calls(key) == 1


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_no_retry_header(sidecar, value):
    key = new_key("noretry")
    rid = sidecar.submit_ok("flaky", {"key": key, "fail": 2, "status": 503},
                            headers={"X-Fal-No-Retry": value})["request_id"]
    r = sidecar.wait_result(rid)
    assert r.status_code == 503, r.text
    assert r.json() == {"detail": "flaky"}
    assert sidecar.app_calls(key) == 1


def test_retries_are_bounded(make_sidecar):
    sc = make_sidecar("--max-concurrency", "2", "--app-retry-delays", "0.05,0.05", "--max-app-attempts", "3",
                      base_flags=False)
    key = new_key("bounded")
    rid = sc.submit_ok("flaky", {"key": key, "fail": 100, "status": 503})["request_id"]
    status = sc.wait_completed(rid, timeout=15)
    r = sc.result(rid)
    assert r.status_code == 503, r.text
    assert sc.app_calls(key) == 3
    assert status["status"] == "COMPLETED"
