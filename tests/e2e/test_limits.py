"""Bounds and bad input: body size, malformed bodies and ids, unknown ids."""

from __future__ import annotations

import pytest

MIB = 1024 * 1024
UNKNOWN = "00000000-0000-4000-8000-000000000000"


def _json_error(r, *codes):
    assert r.status_code in codes, (r.request.method, str(r.request.url), r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    assert isinstance(r.json().get("detail"), str) and r.json()["detail"], r.text


@pytest.mark.parametrize("where", ["gen C submit", "gen A submit", "gen B submit", "direct call"])
def test_oversized_body_413(sidecar, where):
    body = b"x" * (10 * MIB + 1)
    url = {
        "gen C submit": f"{sidecar.queue_url}/test/app/echo",
        "gen A submit": f"{sidecar.run_url}/fal/queue/submit/echo",
        "gen B submit": f"{sidecar.run_url}/fal/queue/submit",
        "direct call": f"{sidecar.run_url}/echo",
    }[where]
    r = sidecar.http.post(url, content=body, headers={"Content-Type": "application/octet-stream"})
    _json_error(r, 413)


def test_body_just_under_limit_is_accepted(sidecar):
    body = b"y" * (10 * MIB - 1024)
    r = sidecar.submit("echo", content=body, headers={"Content-Type": "application/octet-stream"})
    assert 200 <= r.status_code < 300, r.text[:300]
    res = sidecar.wait_result(r.json()["request_id"], timeout=20)
    assert res.status_code == 200
    assert len(res.json()["body"]) == len(body)


def test_custom_max_body_bytes(make_sidecar):
    sc = make_sidecar("--max-body-bytes", "1000", name="small-body")
    assert 200 <= sc.submit("echo", content=b"a" * 1000).status_code < 300
    _json_error(sc.submit("echo", content=b"a" * 1001), 413)
    _json_error(sc.http.post(f"{sc.run_url}/echo", content=b"a" * 1001), 413)


def test_malformed_json_is_forwarded_as_is(sidecar):
    r = sidecar.submit("echo", content=b"{bad json", headers={"Content-Type": "application/json"})
    assert 200 <= r.status_code < 300, r.text
    res = sidecar.wait_result(r.json()["request_id"])
    assert res.status_code == 200
    out = res.json()
    assert out["body"] == "{bad json"
    assert out["json"] is None
    assert out["headers"]["content-type"] == "application/json"


def test_binary_body_is_forwarded_byte_exact(sidecar):
    payload = bytes(range(256)) * 4
    r = sidecar.http.post(f"{sidecar.run_url}/echo", content=payload)
    assert r.status_code == 200
    assert r.json()["body"] == payload.decode("utf-8", errors="replace")


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "..", "%2e%2e%2fetc", "x" * 300, "'; DROP TABLE jobs; --"])
def test_malformed_ids(sidecar, bad_id):
    for r in (
        sidecar.http.get(f"{sidecar.queue_url}/test/app/requests/{bad_id}/status"),
        sidecar.http.get(f"{sidecar.queue_url}/test/app/requests/{bad_id}"),
        sidecar.http.put(f"{sidecar.queue_url}/test/app/requests/{bad_id}/cancel"),
        sidecar.http.get(f"{sidecar.run_url}/fal/queue/requests/{bad_id}/status"),
        sidecar.http.get(f"{sidecar.run_url}/fal/queue/{bad_id}/get"),
    ):
        assert r.status_code in (400, 404), (str(r.request.url), r.status_code, r.text[:300])
        assert r.headers.get("content-type", "").startswith("application/json"), (str(r.request.url), r.headers)
        body = r.json()
        assert body.get("detail") or body.get("status") == "NOT_FOUND", body


def test_unknown_ids_404_everywhere(sidecar):
    for r in (
        sidecar.status(UNKNOWN),
        sidecar.result(UNKNOWN),
        sidecar.http.get(f"{sidecar.run_url}/fal/queue/requests/{UNKNOWN}/status"),
        sidecar.http.get(f"{sidecar.run_url}/fal/queue/requests/{UNKNOWN}/response"),
        sidecar.http.get(f"{sidecar.run_url}/fal/queue/{UNKNOWN}/get"),
    ):
        _json_error(r, 404)


def test_unknown_queue_route_is_json_404(sidecar):
    r = sidecar.http.get(f"{sidecar.queue_url}/test/app/requests/{UNKNOWN}/nonsense")
    assert r.status_code in (404, 405), r.text
    assert r.json().get("detail")


def _two_requests_on_one_connection(port: int, target: str, body: bytes, extra_headers: str = ""):
    """Send the same POST twice on one keep-alive connection. Returns the first
    response's head and what happened to the second request."""
    import socket

    req = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
           f"{extra_headers}Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(req)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                break
            head += chunk
        first = head.split(b"\r\n\r\n")[0].decode(errors="replace")
        try:
            s.sendall(req)
            second = s.recv(65536)
            second_status = second.split(b"\r\n")[0].decode() if second else "connection closed"
        except OSError as exc:
            second_status = f"connection error {exc!r}"
    return first, second_status


@pytest.mark.parametrize("case", ["refused webhook", "bad timeout header"])
def test_early_submit_errors_do_not_break_keep_alive(sidecar, case):
    """An error answered before the body is read must either say `Connection: close`
    or leave the connection usable; otherwise clients reusing it fail at random."""
    body = b'{"pad": "' + b"x" * 300_000 + b'"}'
    target, extra = {
        "refused webhook": ("/test/app/echo?fal_webhook=http%3A%2F%2F10.0.0.1%2F", ""),
        "bad timeout header": ("/test/app/echo", "X-Fal-Request-Timeout: soon\r\n"),
    }[case]
    first, second = _two_requests_on_one_connection(sidecar.queue_port, target, body, extra)
    assert first.startswith("HTTP/1.1 400"), first
    says_close = "connection: close" in first.lower()
    assert says_close or second.startswith("HTTP/1.1 400"), (
        f"connection dropped after an early 400 without `Connection: close` (second request: {second})"
    )
