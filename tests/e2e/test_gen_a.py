"""Generation A: the seed document's per-app queue (/fal/queue/submit, /{id}/get, /{id}/cancel)."""

from __future__ import annotations

import pytest

from helpers import wait_until


def submit_a(sc, path="test", json=None, trailing_slash=False, **kw):
    url = f"{sc.run_url}/fal/queue/submit/{path}" if path else f"{sc.run_url}/fal/queue/submit"
    if trailing_slash:
        url += "/"
    r = sc.http.post(url, json={} if json is None else json, **kw)
    assert r.status_code == 200, f"{url} -> {r.status_code} {r.text}"
    body = r.json()
    assert isinstance(body.get("request_id"), str) and body["request_id"], body
    return body["request_id"]


def get_a(sc, rid, method="GET", slash=False):
    url = f"{sc.run_url}/fal/queue/{rid}/get" + ("/" if slash else "")
    return sc.http.request(method, url)


def wait_done_a(sc, rid, timeout=15.0, method="GET"):
    def check():
        r = get_a(sc, rid, method)
        return r if r.status_code != 202 else None

    return wait_until(check, timeout=timeout, what=f"gen A /get of {rid} to stop being 202")


def test_seed_app_roundtrip(sidecar):
    rid = submit_a(sidecar, "test", {"prompt": "hi"})
    r = wait_done_a(sidecar, rid)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"message": "Hello from fal-serverless!", "input": {"prompt": "hi"}}
    # POST also works for /get, and the result can be read again
    r2 = get_a(sidecar, rid, method="POST")
    assert r2.status_code == 200 and r2.json() == r.json()


def test_pending_202_with_queue_position_then_app_body(serial_sidecar):
    sc = serial_sidecar
    busy = submit_a(sc, "slow", {"seconds": 10})
    sc.wait_app_saw("/slow", busy)
    rid = submit_a(sc, "test", {"n": 1})

    r = get_a(sc, rid)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "IN_QUEUE"
    assert body["queue_position"] == 0

    r = get_a(sc, busy, method="POST")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "IN_PROGRESS"

    # cancel the busy one (running → app gets /slow/cancel → 499), queue drains
    c = sc.http.post(f"{sc.run_url}/fal/queue/{busy}/cancel")
    assert 200 <= c.status_code < 300, c.text
    r = wait_done_a(sc, rid)
    assert r.status_code == 200
    assert r.json() == {"message": "Hello from fal-serverless!", "input": {"n": 1}}
    assert "status" not in r.json()


def test_cancel_queued_via_gen_a(serial_sidecar):
    sc = serial_sidecar
    busy = submit_a(sc, "slow", {"seconds": 10})
    sc.wait_app_saw("/slow", busy)
    rid = submit_a(sc, "echo", {"q": 1})
    c = sc.http.post(f"{sc.run_url}/fal/queue/{rid}/cancel")
    assert c.status_code == 202, c.text
    assert c.json().get("status") == "CANCELLATION_REQUESTED"
    r = wait_done_a(sc, rid)
    assert r.status_code == 499, r.text
    # PUT is accepted too (on the running one)
    c = sc.http.put(f"{sc.run_url}/fal/queue/{busy}/cancel")
    assert c.status_code == 202, c.text
    assert wait_done_a(sc, busy).status_code == 499
    # the cancelled queued request never reached the app
    assert all(e["x-fal-request-id"] != rid for e in sc.app_seen())


@pytest.mark.parametrize("where", ["submit", "get", "cancel"])
def test_trailing_slashes(sidecar, where):
    rid = submit_a(sidecar, "echo", {"slash": where}, trailing_slash=(where == "submit"))
    r = wait_until(lambda: (lambda x: x if x.status_code != 202 else None)(get_a(sidecar, rid, slash=True)),
                   what="gen A /get/ with a trailing slash")
    assert r.status_code == 200, r.text
    assert r.json()["json"] == {"slash": where}
    if where == "submit":
        assert r.json()["path"] in ("/echo", "/echo/")
    if where == "cancel":
        c = sidecar.http.post(f"{sidecar.run_url}/fal/queue/{rid}/cancel/")
        assert c.status_code == 400, c.text
        assert c.json().get("status") == "ALREADY_COMPLETED"


def test_unknown_id_gen_a(sidecar):
    r = get_a(sidecar, "00000000-0000-4000-8000-000000000000")
    assert r.status_code == 404
    assert "detail" in r.json() or r.json().get("status") == "NOT_FOUND"


def test_app_error_status_is_replayed(sidecar):
    rid = submit_a(sidecar, "fail", {"status": 418})
    r = wait_done_a(sidecar, rid)
    assert r.status_code == 418
    assert r.json() == {"detail": "failing on purpose with 418"}
