"""Generation C: the queue host API at the root of --queue-listen."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from helpers import wait_until

UNKNOWN = "00000000-0000-4000-8000-000000000000"


def test_submit_fields_and_urls(sidecar):
    r = sidecar.submit("echo", {"x": 1}, headers={"X-Fal-Runner-Hint": "anything"})
    assert 200 <= r.status_code < 300, r.text
    body = r.json()
    rid = body["request_id"]
    assert body["status"] == "IN_QUEUE"
    assert isinstance(body["queue_position"], int) and body["queue_position"] >= 0
    base = f"{sidecar.queue_url}/test/app/requests/{rid}"
    assert body["response_url"] == base
    assert body["status_url"] == base + "/status"
    assert body["cancel_url"] == base + "/cancel"
    assert r.headers.get("x-fal-request-id") == rid

    # the URLs are reachable as given
    st = wait_until(lambda: (lambda s: s if s.status_code == 200 else None)(sidecar.http.get(body["status_url"])),
                    what="status_url to report COMPLETED")
    assert st.json()["status"] == "COMPLETED"
    assert st.headers.get("x-fal-request-id") == rid
    res = sidecar.http.get(body["response_url"])
    assert res.status_code == 200
    assert res.json()["json"] == {"x": 1}
    assert res.headers.get("x-fal-request-id") == rid
    c = sidecar.http.put(body["cancel_url"])
    assert c.status_code == 400 and c.json().get("status") == "ALREADY_COMPLETED", c.text


def test_submit_urls_follow_host_header(sidecar):
    r = sidecar.submit("echo", {}, headers={"Host": "gateway.example:8443"})
    assert 200 <= r.status_code < 300, r.text
    body = r.json()
    assert body["response_url"].startswith("http://gateway.example:8443/test/app/requests/"), body
    assert body["status_url"].startswith("http://gateway.example:8443/"), body
    sidecar.wait_completed(body["request_id"])


def test_submit_urls_follow_x_forwarded(sidecar):
    r = sidecar.submit("echo", {}, headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "queue.example.com"})
    assert 200 <= r.status_code < 300, r.text
    body = r.json()
    assert body["response_url"] == f"https://queue.example.com/test/app/requests/{body['request_id']}", body
    sidecar.wait_completed(body["request_id"])


def test_submit_without_body(sidecar):
    # the JS client may send no body at all
    r = sidecar.http.post(f"{sidecar.queue_url}/test/app/echo")
    assert 200 <= r.status_code < 300, r.text
    res = sidecar.wait_result(r.json()["request_id"])
    assert res.status_code == 200
    assert res.json()["body"] == ""


@pytest.mark.parametrize("on, off", [("true", "false"), ("1", "0")])
def test_status_logs_param(sidecar, on, off):
    rid = sidecar.submit_ok("logs", {"lines": 3})["request_id"]
    sidecar.wait_completed(rid)
    r = sidecar.status(rid, logs=on)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "COMPLETED"
    assert body["request_id"] == rid
    for key in ("response_url", "status_url", "cancel_url"):
        assert body[key].startswith(sidecar.queue_url), body
    assert isinstance(body["logs"], list)
    messages = [(i["message"].rstrip("\n"), i["level"]) for i in body["logs"]]
    assert ("log line 0", "STDOUT") in messages, messages
    assert ("warning on stderr", "STDERR") in messages, messages
    assert isinstance(body["metrics"].get("inference_time"), (int, float))
    assert body.get("error") is None

    r = sidecar.status(rid, logs=off)
    assert r.status_code == 200
    assert "logs" in r.json() and r.json()["logs"] is None
    # no logs param at all: the key is still there
    r = sidecar.status(rid)
    assert "logs" in r.json()
    # trailing slash
    r = sidecar.http.get(sidecar.req_url(rid) + "/status/", params={"logs": on})
    assert r.status_code == 200 and isinstance(r.json()["logs"], list)


def test_in_progress_status_has_logs_key(sidecar):
    rid = sidecar.submit_ok("slow", {"seconds": 10})["request_id"]
    try:
        sidecar.wait_app_saw("/slow", rid)
        r = sidecar.status(rid, logs="false")
        assert r.status_code == 202
        assert r.json()["status"] == "IN_PROGRESS"
        assert "logs" in r.json() and r.json()["logs"] is None

        def has_log():
            body = sidecar.status(rid, logs="true").json()
            assert body["status"] == "IN_PROGRESS", body
            return any(i["message"].startswith("slow: starting") for i in body["logs"] or [])

        wait_until(has_log, timeout=5, what="the running request's log line in its status")
    finally:
        sidecar.cancel(rid)


def read_sse(client: httpx.Client, url: str, params=None, timeout=15.0):
    events = []
    headers = {"Accept": "application/json, text/event-stream"}
    deadline = time.monotonic() + timeout
    with client.stream("GET", url, params=params or {}, headers=headers,
                       timeout=httpx.Timeout(timeout, connect=5)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        data_lines = []
        for line in r.iter_lines():
            assert time.monotonic() < deadline, "SSE stream did not close in time"
            if line.startswith(":"):
                continue  # keep-alive comment
            if line.startswith("data:"):
                data_lines.append(line[5:].lstrip(" "))
            elif line == "":
                if data_lines:
                    events.append(json.loads("\n".join(data_lines)))
                    data_lines = []
        if data_lines:
            events.append(json.loads("\n".join(data_lines)))
    return events


def test_status_stream_until_completed(sidecar):
    rid = sidecar.submit_ok("slow", {"seconds": 0.6})["request_id"]
    events = read_sse(sidecar.http, sidecar.req_url(rid) + "/status/stream", {"logs": "1"})
    assert events, "no SSE events"
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "COMPLETED", statuses
    assert statuses.count("COMPLETED") == 1, statuses
    assert "IN_PROGRESS" in statuses or "IN_QUEUE" in statuses, statuses
    for e in events:
        assert e["request_id"] == rid
    assert isinstance(events[-1]["logs"], list)
    # already completed: one COMPLETED event then close
    events = read_sse(sidecar.http, sidecar.req_url(rid) + "/status/stream", {"logs": "0"})
    assert [e["status"] for e in events] == ["COMPLETED"]


def test_status_stream_unknown_404(sidecar):
    r = sidecar.http.get(sidecar.req_url(UNKNOWN) + "/status/stream")
    assert r.status_code == 404


def test_result_before_completion_is_400(sidecar):
    rid = sidecar.submit_ok("slow", {"seconds": 10})["request_id"]
    try:
        r = sidecar.result(rid)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert isinstance(r.json().get("detail"), str) and r.json()["detail"]
    finally:
        sidecar.cancel(rid)


@pytest.mark.parametrize("ns", ["workflows", "comfy"])
def test_namespaced_endpoint_ids(sidecar, ns):
    endpoint = f"{ns}/someone/pipeline"
    r = sidecar.http.post(f"{sidecar.queue_url}/{endpoint}/echo/deep", json={"ns": ns})
    assert 200 <= r.status_code < 300, r.text
    body = r.json()
    rid = body["request_id"]
    assert body["response_url"] == f"{sidecar.queue_url}/{endpoint}/requests/{rid}"
    assert body["status_url"] == f"{sidecar.queue_url}/{endpoint}/requests/{rid}/status"
    sidecar.wait_completed(rid, endpoint=endpoint)
    res = sidecar.result(rid, endpoint=endpoint)
    assert res.status_code == 200
    assert res.json()["path"] == "/echo/deep"
    assert res.json()["json"] == {"ns": ns}


def test_any_owner_alias_maps_to_the_app(sidecar):
    r = sidecar.http.post(f"{sidecar.queue_url}/12345/other-alias/test", json={"o": 1})
    assert 200 <= r.status_code < 300, r.text
    rid = r.json()["request_id"]
    res = sidecar.wait_result(rid, endpoint="12345/other-alias")
    assert res.json() == {"message": "Hello from fal-serverless!", "input": {"o": 1}}


def test_unknown_request_404(sidecar):
    for r in (sidecar.status(UNKNOWN), sidecar.status(UNKNOWN, logs="1"), sidecar.result(UNKNOWN)):
        assert r.status_code == 404, (r.request.url, r.text)
        assert r.headers["content-type"].startswith("application/json")
    c = sidecar.cancel(UNKNOWN)
    assert c.status_code == 404 and c.json().get("status") == "NOT_FOUND", c.text


def test_jwks_served_on_both_hosts(sidecar):
    for base in (sidecar.run_url, sidecar.queue_url):
        r = sidecar.http.get(f"{base}/.well-known/jwks.json")
        assert r.status_code == 200, (base, r.text)
        keys = r.json()["keys"]
        assert keys, r.text
        for k in keys:
            assert k["kty"] == "OKP" and k["crv"] == "Ed25519" and k.get("kid"), k
            raw = base64.urlsafe_b64decode(k["x"] + "=" * (-len(k["x"]) % 4))
            assert len(raw) == 32
            assert "=" not in k["x"], "base64url without padding"
