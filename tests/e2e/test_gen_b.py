"""Generation B: per-app host, /fal/queue/submit + /fal/queue/requests/{id}/{status,response,cancel}."""

from __future__ import annotations

import uuid

import pytest

from helpers import wait_until

UNKNOWN = "00000000-0000-4000-8000-000000000000"


def submit_b(sc, path=None, json=None, content=None, headers=None):
    url = f"{sc.run_url}/fal/queue/submit" + (f"/{path}" if path else "")
    kw = {"content": content} if content is not None else {"json": {} if json is None else json}
    r = sc.http.post(url, headers=headers or {}, **kw)
    assert r.status_code == 200, f"{url} -> {r.status_code} {r.text}"
    rid = r.json()["request_id"]
    assert isinstance(rid, str) and rid
    return rid


def status_b(sc, rid, logs=None, slash=False):
    url = f"{sc.run_url}/fal/queue/requests/{rid}/status" + ("/" if slash else "")
    return sc.http.get(url, params={} if logs is None else {"logs": logs})


def response_b(sc, rid):
    return sc.http.get(f"{sc.run_url}/fal/queue/requests/{rid}/response")


def wait_200(sc, rid, timeout=15.0):
    def check():
        r = status_b(sc, rid)
        assert r.status_code in (200, 202), r.text
        return r if r.status_code == 200 else None

    return wait_until(check, timeout=timeout, what=f"gen B status of {rid} to be 200")


def test_submit_without_path_goes_to_root(sidecar):
    rid = submit_b(sidecar)
    r = wait_200(sidecar, rid)
    assert r.json()["status"] == "COMPLETED"
    resp = response_b(sidecar, rid)
    assert resp.status_code == 200
    assert resp.json() == {"ok": True}


def test_status_202_then_200_and_response(sidecar):
    rid = submit_b(sidecar, "slow", {"seconds": 0.8})
    r = status_b(sidecar, rid)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert body["request_id"] == rid
    if body["status"] == "IN_QUEUE":
        assert isinstance(body["queue_position"], int)
    else:
        assert "logs" in body
    r = wait_200(sidecar, rid)
    body = r.json()
    assert body["status"] == "COMPLETED"
    assert body["request_id"] == rid
    assert "logs" in body
    assert isinstance(body.get("metrics"), dict) and "inference_time" in body["metrics"]
    resp = response_b(sidecar, rid)
    assert resp.status_code == 200
    assert resp.json() == {"slept": 0.8}
    assert resp.headers.get("x-fal-request-id") == rid


def test_status_logs_param_and_trailing_slash(sidecar):
    rid = submit_b(sidecar, "logs", {"lines": 2})
    wait_200(sidecar, rid)
    r = status_b(sidecar, rid, logs="1", slash=True)
    assert r.status_code == 200, r.text
    msgs = [item["message"].rstrip("\n") for item in r.json()["logs"]]
    assert "log line 0" in msgs and "log line 1" in msgs, msgs
    r = status_b(sidecar, rid, logs="0")
    assert r.status_code == 200 and r.json()["logs"] is None


@pytest.mark.parametrize(
    "path, json, status, ctype, check",
    [
        ("echo", {"v": 1}, 200, "application/json", lambda r: r.json()["json"] == {"v": 1}),
        ("fail", {"status": 422}, 422, "application/json",
         lambda r: r.json() == {"detail": "failing on purpose with 422"}),
        ("notjson", {}, 200, "text/plain", lambda r: r.text == "plain text"),
        ("bytes", {"n": 1000}, 200, "application/octet-stream", lambda r: r.content == b"x" * 1000),
    ],
)
def test_response_replays_status_content_type_body(sidecar, path, json, status, ctype, check):
    rid = submit_b(sidecar, path, json)
    wait_200(sidecar, rid)
    r = response_b(sidecar, rid)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(ctype), r.headers
    assert check(r), r.text


def test_unknown_ids_404(sidecar):
    for r in (status_b(sidecar, UNKNOWN), response_b(sidecar, UNKNOWN),
              status_b(sidecar, str(uuid.uuid4()), logs="1")):
        assert r.status_code == 404, (r.request.url, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")


def test_cancel_gen_b(serial_sidecar):
    sc = serial_sidecar
    busy = submit_b(sc, "slow", {"seconds": 10})
    sc.wait_app_saw("/slow", busy)
    rid = submit_b(sc, "echo", {})
    c = sc.http.put(f"{sc.run_url}/fal/queue/requests/{rid}/cancel")
    assert c.status_code == 202 and c.json()["status"] == "CANCELLATION_REQUESTED", c.text
    c = sc.http.put(f"{sc.run_url}/fal/queue/requests/{busy}/cancel")
    assert c.status_code == 202, c.text
    wait_200(sc, rid)
    assert response_b(sc, rid).status_code == 499
    wait_200(sc, busy)
    assert response_b(sc, busy).status_code == 499
    c = sc.http.put(f"{sc.run_url}/fal/queue/requests/{UNKNOWN}/cancel")
    assert c.status_code == 404 and c.json().get("status") == "NOT_FOUND", c.text
