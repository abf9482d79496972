"""Direct calls on --listen: any path outside /fal/queue/ is proxied verbatim to the app."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_method_path_query_body_headers_verbatim(sidecar, method):
    body = b'{"k": "v", "n": [1, 2, 3]}' if method != "GET" else b""
    r = sidecar.http.request(
        method,
        f"{sidecar.run_url}/echo/a/b%20c?x=1&y=two+words&x=2&empty=",
        content=body,
        headers={"X-Custom-Header": "custom value", "Content-Type": "application/json",
                 "Authorization": "Key abc:def"},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["method"] == method
    assert out["path"] == "/echo/a/b%20c"
    assert out["query"] == "x=1&y=two+words&x=2&empty="
    assert out["body"] == body.decode()
    assert out["headers"]["x-custom-header"] == "custom value"
    assert out["headers"]["content-type"] == "application/json"
    if body:
        assert out["json"] == {"k": "v", "n": [1, 2, 3]}


def test_status_and_content_type_pass_through(sidecar):
    r = sidecar.http.post(f"{sidecar.run_url}/fail", params={"status": "418"})
    assert r.status_code == 418
    assert r.json() == {"detail": "failing on purpose with 418"}
    r = sidecar.http.post(f"{sidecar.run_url}/notjson")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == "plain text"
    r = sidecar.http.get(f"{sidecar.run_url}/no/such/route")
    assert r.status_code == 404 and r.json() == {"detail": "no such route"}
    r = sidecar.http.post(f"{sidecar.run_url}/test", json={"seed": True})
    assert r.json() == {"message": "Hello from fal-serverless!", "input": {"seed": True}}


def test_direct_call_is_not_retried(sidecar):
    from helpers import new_key

    key = new_key("direct")
    r = sidecar.http.post(f"{sidecar.run_url}/flaky", params={"key": key, "fail": "1", "status": "503"})
    assert r.status_code == 503
    assert sidecar.app_calls(key) == 1


def test_large_streamed_response(sidecar):
    n = 24 * 1024 * 1024  # larger than the default request body limit
    total = 0
    bad = 0
    with sidecar.http.stream("POST", f"{sidecar.run_url}/bytes", params={"n": str(n)}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        for chunk in r.iter_bytes():
            total += len(chunk)
            bad += len(chunk) - chunk.count(b"x")
    assert total == n
    assert bad == 0


def test_keep_alive_many_requests(sidecar):
    for i in range(50):
        r = sidecar.http.post(f"{sidecar.run_url}/echo", json={"i": i})
        assert r.status_code == 200 and r.json()["json"] == {"i": i}


def test_queued_calls_carry_request_id_and_endpoint_headers(sidecar):
    rid = sidecar.submit_ok("echo/sub", {"h": 1}, headers={"Keep-Alive": "timeout=5", "X-User-Thing": "u"})["request_id"]
    res = sidecar.wait_result(rid)
    headers = res.json()["headers"]
    assert headers.get("x-fal-request-id") == rid
    assert headers.get("x-fal-endpoint"), headers
    assert "echo/sub" in headers["x-fal-endpoint"], headers["x-fal-endpoint"]
    assert headers.get("x-user-thing") == "u"
    assert "keep-alive" not in headers, "hop-by-hop header forwarded to the app"
    entry = sidecar.wait_app_saw("/echo/sub", rid)
    assert entry["x-fal-endpoint"] == headers["x-fal-endpoint"]

    # gen A / gen B queued calls carry them too
    r = sidecar.http.post(f"{sidecar.run_url}/fal/queue/submit/echo", json={})
    assert r.status_code == 200, r.text
    rid2 = r.json()["request_id"]
    entry = sidecar.wait_app_saw("/echo", rid2)
    assert entry["x-fal-endpoint"] and "echo" in entry["x-fal-endpoint"], entry


def test_direct_calls_get_no_fal_queue_handling(sidecar):
    # paths that merely look like queue ids are still proxied
    r = sidecar.http.get(f"{sidecar.run_url}/echo/fal/queue-ish/requests/x/status")
    assert r.status_code == 200
    assert r.json()["path"] == "/echo/fal/queue-ish/requests/x/status"
