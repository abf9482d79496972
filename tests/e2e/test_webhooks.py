"""Webhooks: payload shapes, Ed25519 signatures (verified independently), retries
while the receiver is down, no redirects, SSRF refusals at submit."""

from __future__ import annotations

import re
import time

import pytest

from helpers import wait_until
from webhook_receiver import load_jwks_keys, verify_signature


def test_ok_payload_and_signature_headers(sidecar, receiver):
    rid = sidecar.submit_ok("echo", {"w": 1}, webhook=receiver.url("/ok"))["request_id"]
    result = sidecar.wait_result(rid).json()
    d = receiver.wait_for(rid)
    assert d.path == "/ok"
    assert d.headers["content-type"].startswith("application/json")
    assert d.headers["x-fal-webhook-request-id"] == rid
    assert d.headers["x-fal-webhook-user-id"] == "test"  # the owner of endpoint test/app
    assert re.fullmatch(r"[0-9a-f]{128}", d.headers["x-fal-webhook-signature"])
    assert abs(int(d.headers["x-fal-webhook-timestamp"]) - time.time()) < 60
    body = d.json
    assert body["status"] == "OK"
    assert body["request_id"] == rid
    assert "gateway_request_id" in body
    assert body["payload"] == result
    assert "error" not in body or body["error"] is None


def test_signature_rejects_tampering(sidecar, receiver):
    """The receiver's verifier is not vacuous: a modified body or header fails."""
    rid = sidecar.submit_ok("echo", {}, webhook=receiver.url("/tamper"))["request_id"]
    d = receiver.wait_for(rid)
    keys = load_jwks_keys(sidecar.http.get(sidecar.jwks_url).json())
    assert verify_signature(d.headers, d.body, keys) is None
    assert verify_signature(d.headers, d.body + b" ", keys) is not None
    bad = dict(d.headers, **{"x-fal-webhook-request-id": "someone-else"})
    assert verify_signature(bad, d.body, keys) is not None
    old = dict(d.headers, **{"x-fal-webhook-timestamp": str(int(time.time()) - 3600)})
    assert verify_signature(old, d.body, keys) is not None


def test_error_payload_for_app_error(sidecar, receiver):
    rid = sidecar.submit_ok("fail", {"status": 422}, webhook=receiver.url("/err"))["request_id"]
    sidecar.wait_completed(rid)
    d = receiver.wait_for(rid)
    body = d.json
    assert body["status"] == "ERROR"
    assert body["request_id"] == rid
    assert body["error"] == "Invalid status code: 422"
    assert body["payload"] == {"detail": "failing on purpose with 422"}


def test_payload_error_for_non_json_output(sidecar, receiver):
    rid = sidecar.submit_ok("notjson", {}, webhook=receiver.url("/plain"))["request_id"]
    sidecar.wait_completed(rid)
    d = receiver.wait_for(rid)
    body = d.json
    assert body["request_id"] == rid
    assert body["status"] == "OK"
    assert "payload" in body and body["payload"] is None
    assert isinstance(body.get("payload_error"), str) and body["payload_error"]


def test_receiver_down_then_up_is_delivered(make_sidecar, make_receiver):
    sc = make_sidecar("--webhook-retry-delays", "0.3,0.3,0.5,0.5,1,1,1,2", base_flags=False)
    rcv = make_receiver(sc, start=False)
    rid = sc.submit_ok("test", {"late": True}, webhook=rcv.url("/late"))["request_id"]
    result = sc.wait_result(rid).json()
    time.sleep(0.8)  # first attempts hit a closed port
    rcv.start()
    d = rcv.wait_for(rid, timeout=15)
    assert d.json["status"] == "OK"
    assert d.json["payload"] == result
    time.sleep(1.0)
    assert len(rcv.for_request(rid)) == 1, "delivered more than once after a 2xx"


def test_receiver_errors_are_retried(sidecar, receiver):
    receiver.respond("/flaky-hook", 500, 503)
    rid = sidecar.submit_ok("echo", {}, webhook=receiver.url("/flaky-hook"))["request_id"]
    d = receiver.wait_for(rid, timeout=15)
    attempts = receiver.attempts("/flaky-hook")
    assert [a.answered for a in attempts][:3] == [500, 503, 200], [a.answered for a in attempts]
    assert all(a.verified for a in attempts), [a.verify_error for a in attempts]
    assert d.json["status"] == "OK"


def test_redirects_are_not_followed(sidecar, receiver):
    receiver.respond("/redirect", 307, 307, 307, 307, 307, 307, 307, 307, 307, 307, 307)
    rid = sidecar.submit_ok("echo", {}, webhook=receiver.url("/redirect"))["request_id"]
    sidecar.wait_completed(rid)
    wait_until(lambda: receiver.attempts("/redirect"), what="a delivery attempt to /redirect")
    time.sleep(1.0)
    assert receiver.attempts("/redirect-target") == [], "webhook followed a redirect"


@pytest.mark.parametrize("gen", ["A", "B"])
def test_webhook_on_older_generations(sidecar, receiver, gen):
    path = "/fal/queue/submit/test" if gen == "A" else "/fal/queue/submit/echo"
    r = sidecar.http.post(f"{sidecar.run_url}{path}", params={"fal_webhook": receiver.url(f"/gen{gen}")},
                          json={"gen": gen})
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    d = receiver.wait_for(rid)
    assert d.path == f"/gen{gen}"
    assert d.json["status"] == "OK"
    assert d.json["request_id"] == rid


REFUSED = [
    "http://10.0.0.1/",
    "http://10.1.2.3:8080/hook",
    "http://172.16.0.1/",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://167772161/",  # 10.0.0.1 as a single integer
    "ftp://127.0.0.1/x",
    "not a url",
]


@pytest.mark.parametrize("url", REFUSED)
def test_ssrf_refused_at_submit(sidecar, url):
    r = sidecar.submit("echo", {}, webhook=url)
    assert r.status_code == 400, f"{url!r} accepted: {r.status_code} {r.text}"
    assert isinstance(r.json().get("detail"), str) and r.json()["detail"]


@pytest.mark.parametrize("gen", ["A", "B"])
def test_ssrf_refused_on_older_generations(sidecar, gen):
    path = "/fal/queue/submit/test" if gen == "A" else "/fal/queue/submit"
    r = sidecar.http.post(f"{sidecar.run_url}{path}", params={"fal_webhook": "http://169.254.169.254/"}, json={})
    assert r.status_code == 400, r.text
    assert r.json().get("detail")


NO_LOOPBACK_FLAGS = [
    "--no-webhook-loopback",
    "--webhook-deny-loopback",
    "--no-default-webhook-allow",
    "--webhook-no-default-allow",
    "--no-loopback-webhooks",
    "--webhook-allow-loopback=false",
    "--webhook-allow-loopback",
]


def test_loopback_refused_without_default_allowance(make_sidecar, sidecar_help):
    flag = next((f for f in NO_LOOPBACK_FLAGS if f.split("=")[0] in sidecar_help), None)
    if flag is None:
        pytest.skip("fal-sidecar run has no flag that removes the default loopback webhook allowance "
                    f"(looked for {', '.join(NO_LOOPBACK_FLAGS)} in `run --help`)")
    if flag == "--webhook-allow-loopback":
        flag = "--webhook-allow-loopback=false"
    sc = make_sidecar(flag, name="no-loopback")
    for url in ("http://127.0.0.1:9/hook", "http://localhost:9/", "http://[::1]:9/"):
        r = sc.submit("echo", {}, webhook=url)
        assert r.status_code == 400, f"{url} accepted without the loopback allowance: {r.text}"
        assert r.json().get("detail")


def _local_non_loopback_ipv4():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_webhook_allow_adds_an_address(make_sidecar):
    from webhook_receiver import WebhookReceiver

    ip = _local_non_loopback_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine to bind a receiver to")
    sc = make_sidecar("--webhook-allow", f"{ip}/32", name="allow-sidecar")
    rcv = WebhookReceiver(sc.jwks_url, host=ip).start()
    try:
        rid = sc.submit_ok("echo", {"allowed": ip}, webhook=rcv.url("/allowed"))["request_id"]
        d = rcv.wait_for(rid)
        assert d.json["status"] == "OK"
        # loopback stays allowed, other private/metadata addresses stay refused
        assert 200 <= sc.submit("echo", {}, webhook="http://127.0.0.1:9/x").status_code < 300
        r = sc.submit("echo", {}, webhook="http://169.254.169.254/")
        assert r.status_code == 400, r.text
    finally:
        rcv.stop()
