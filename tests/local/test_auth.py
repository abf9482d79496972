"""API keys through the gateway of `fal-operator local` (issue 15): FalKeys beside the
FalFunctions in the -f files; the real fal clients with a key; every refusal (401,
403, 429) with its JSON detail; shared and public functions; requests kept to the
tenant that submitted them; tokens of /tokens/ as fal_client fetches them; one rate
budget across two gateways on one Redis."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid

import fal_client
import fal_client.client as fal_client_module
import httpx
import pytest
from helpers import REPO
from local_proc import function
from helpers import wait_until


def falkey(name: str, namespace: str, **spec) -> tuple[dict, str]:
    """A FalKey document and its FAL_KEY (`id:secret`)."""
    key_id = str(uuid.uuid4())
    secret = secrets.token_hex(32)
    body = {"keyId": key_id, "secretSha256": hashlib.sha256(secret.encode()).hexdigest(), **spec}
    doc = {
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalKey",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }
    return doc, f"{key_id}:{secret}"


def key_header(fal_key: str) -> dict:
    return {"Authorization": f"Key {fal_key}"}


@pytest.fixture
def point_fal(monkeypatch):
    def point(loc):
        monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{loc.queue_url}/")
        monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{loc.run_url}/")
        monkeypatch.setattr(fal_client_module, "REST_URL", loc.run_url)
    return point


def assert_refused(r: httpx.Response, status: int, *words: str, secret: str | None = None):
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, detail
    if status == 401:
        assert r.headers.get("www-authenticate") == "Key", r.headers
    if secret:
        assert secret not in r.text and secret not in str(r.headers), "a secret was echoed"


def test_official_clients_with_a_key(make_local, point_fal, monkeypatch):
    """fal_client (SyncClient(key=…) and FAL_KEY) and @fal-ai/client (credentials)
    with a valid key: submit, status, result, status stream, run, cancel. The key never
    reaches the app."""
    kdoc, fal_key = falkey("ci", "team-a")
    loc = make_local([function("echo", "team-a", minReplicas=1, maxReplicas=2, maxConcurrency=2), kdoc])
    point_fal(loc)
    app = "team-a/echo"
    loc.wait_ready(app, 1)

    client = fal_client.SyncClient(key=fal_key)
    handle = client.submit(app, {"x": 1}, path="echo")
    assert handle.get()["json"] == {"x": 1}
    seen = handle.get()["headers"]
    assert "authorization" not in {k.lower() for k in seen}, "the key reached the app"
    assert isinstance(handle.status(with_logs=True), fal_client.Completed)
    assert client.result(app, handle.request_id)["json"] == {"x": 1}
    assert client.run(app + "/test", {"y": 2}) == {"message": "Hello from fal-serverless!", "input": {"y": 2}}
    # The SSE status stream with the same key.
    with httpx.stream("GET", f"{loc.queue_url}/{app}/requests/{handle.request_id}/status/stream",
                      headers=key_header(fal_key), timeout=30) as s:
        assert s.status_code == 200
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert events[-1]["status"] == "COMPLETED"
    # Cancel a running request.
    slow = client.submit(app, {"seconds": 10}, path="slow")
    wait_until(lambda: isinstance(slow.status(), fal_client.InProgress), 30, what="slow to start")
    slow.cancel()
    wait_until(lambda: isinstance(slow.status(), fal_client.Completed), 30, what="cancel to land")
    r = loc.http.get(f"{loc.queue_url}/{app}/requests/{slow.request_id}", headers=key_header(fal_key))
    assert r.status_code == 499, r.text

    # FAL_KEY from the environment, as most users set it.
    monkeypatch.setenv("FAL_KEY", fal_key)
    assert fal_client.SyncClient().subscribe(app, {"z": 3}, path="test")["input"] == {"z": 3}
    # The same client without a key that works is refused, with a clear detail.
    monkeypatch.setenv("FAL_KEY", fal_key.split(":")[0] + ":wrong")
    with pytest.raises(fal_client.client.FalClientHTTPError) as err:
        fal_client.SyncClient().submit(app, {"z": 3}, path="test")
    assert err.value.status_code == 401 and "wrong secret" in str(err.value)

    # The npm client with `credentials`.
    node = shutil.which("node")
    assert node, "node is needed for the npm client test"
    js = REPO / "tests" / "js"
    proc = subprocess.run(
        [node, str(js / "client_check.mjs"), loc.queue_url, loc.run_url],
        capture_output=True, text=True, timeout=120, cwd=js,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "FAL_KEY": fal_key, "FAL_APP": app},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["streaming"] == {"message": "Hello from fal-serverless!", "input": {"x": 1}}
    assert out["status"] == "COMPLETED" and out["result"]["json"] == {"y": 2}
    assert out["cancelled"]["status"] == "COMPLETED"
    assert out["run"] == {"message": "Hello from fal-serverless!", "input": {"z": 3}}


def test_refusals_modes_and_tenants(make_local):
    """Each 401 case, 403 across namespaces and outside `functions`, shared and public
    functions, and another tenant's requests answered like unknown ids."""
    a_doc, a_key = falkey("ci", "team-a")
    b_doc, b_key = falkey("ci", "team-b")
    only_doc, only_key = falkey("only", "team-a", functions=["other"])
    off_doc, off_key = falkey("off", "team-a", disabled=True)
    old_doc, old_key = falkey("old", "team-a", expiresAt="2020-01-01T00:00:00Z")
    loc = make_local([
        function("private", "team-a", minReplicas=1),
        function("shared", "team-a", minReplicas=1, auth="shared"),
        function("public", "team-a", minReplicas=1, auth="public"),
        a_doc, b_doc, only_doc, off_doc, old_doc,
    ])
    for f in ("private", "shared", "public"):
        loc.wait_ready(f"team-a/{f}", 1)
    q, run = loc.queue_url, loc.run_url
    secret_of = lambda k: k.split(":", 1)[1]  # noqa: E731

    # -- 401: missing, malformed, unknown, wrong secret, disabled, expired --------------
    url = f"{q}/team-a/private/test"
    assert_refused(loc.http.post(url, json={}), 401, "needs an API key", "FAL_KEY")
    assert_refused(loc.http.post(url, json={}, headers={"Authorization": "Key nocolon"}), 401, "<key_id>:<key_secret>")
    assert_refused(loc.http.post(url, json={}, headers={"Authorization": "Basic eDp5"}), 401, "needs an API key")
    assert_refused(loc.http.post(url, json={}, headers=key_header("nobody:" + secret_of(a_key))), 401,
                   "unknown key id", secret=secret_of(a_key))
    wrong = a_key.split(":")[0] + ":" + "f" * 64
    assert_refused(loc.http.post(url, json={}, headers=key_header(wrong)), 401, "wrong secret", secret="f" * 64)
    assert_refused(loc.http.post(url, json={}, headers=key_header(off_key)), 401, "disabled", secret=secret_of(off_key))
    assert_refused(loc.http.post(url, json={}, headers=key_header(old_key)), 401, "expired", secret=secret_of(old_key))
    # Every path of a function is checked: run listener sync and per-app queue, gen C reads.
    rid = str(uuid.uuid4())
    for method, u in [
        ("POST", f"{run}/team-a/private/test"),
        ("POST", f"{run}/team-a/private/fal/queue/submit/test"),
        ("GET", f"{run}/team-a/private/fal/queue/{rid}/get"),
        ("GET", f"{run}/team-a/private/fal/queue/requests/{rid}/status"),
        ("GET", f"{q}/team-a/private/requests/{rid}/status"),
        ("GET", f"{q}/team-a/private/requests/{rid}/status/stream"),
        ("GET", f"{q}/team-a/private/requests/{rid}"),
        ("PUT", f"{q}/team-a/private/requests/{rid}/cancel"),
    ]:
        assert_refused(loc.http.request(method, u), 401, "needs an API key")

    # -- 403: another namespace's key on a private function; outside `functions` ---------
    assert_refused(loc.http.post(url, json={}, headers=key_header(b_key)), 403, "private to namespace")
    assert_refused(loc.http.post(url, json={}, headers=key_header(only_key)), 403, "may call only other")
    # Admitted: the namespace's own key.
    assert loc.http.post(url, json={}, headers=key_header(a_key)).status_code == 200

    # -- shared: any valid key; public: no key -------------------------------------------
    assert loc.http.post(f"{run}/team-a/shared/test", json={}, headers=key_header(b_key)).status_code == 200
    assert_refused(loc.http.post(f"{run}/team-a/shared/test", json={}), 401)
    assert_refused(loc.http.post(f"{run}/team-a/shared/test", json={}, headers=key_header(only_key)), 403)
    assert loc.http.post(f"{run}/team-a/public/test", json={}).status_code == 200
    # fal_client always sends some key; on a public function a key that is not valid
    # just makes the call anonymous.
    assert loc.http.post(f"{run}/team-a/public/test", json={}, headers=key_header("x:y")).status_code == 200

    # -- tenants: team-b's request on the shared function is team-b's alone --------------
    shared = f"{q}/team-a/shared"
    r = loc.http.post(shared + "/echo", json={"b": 1}, headers=key_header(b_key))
    assert r.status_code == 200, r.text
    b_rid = r.json()["request_id"]
    wait_until(lambda: loc.http.get(f"{shared}/requests/{b_rid}/status", headers=key_header(b_key)).json()["status"] == "COMPLETED",
               30, what="team-b's request")
    for method, suffix in [("GET", "/status"), ("GET", ""), ("GET", "/status/stream"), ("PUT", "/cancel")]:
        other = loc.http.request(method, f"{shared}/requests/{b_rid}{suffix}", headers=key_header(a_key))
        unknown = loc.http.request(method, f"{shared}/requests/{uuid.uuid4()}{suffix}", headers=key_header(a_key))
        assert other.status_code == unknown.status_code == 404, (suffix, other.text)
        assert other.json()["status"] == "NOT_FOUND"
    mine = loc.http.get(f"{shared}/requests/{b_rid}", headers=key_header(b_key))
    assert mine.status_code == 200 and mine.json()["json"] == {"b": 1}
    # Per-app (generations A/B) reads of the same request: also team-b's alone.
    per_app = f"{run}/team-a/shared/fal/queue"
    assert loc.http.get(f"{per_app}/{b_rid}/get", headers=key_header(a_key)).status_code == 404
    assert loc.http.get(f"{per_app}/{b_rid}/get", headers=key_header(b_key)).status_code == 200
    # Idempotency-Keys are per tenant: the same key from team-a is a new request.
    idem = {"Idempotency-Key": "same-key"}
    r1 = loc.http.post(shared + "/echo", json={}, headers={**key_header(b_key), **idem}).json()["request_id"]
    r2 = loc.http.post(shared + "/echo", json={}, headers={**key_header(a_key), **idem}).json()["request_id"]
    assert r1 != r2

    # -- public, anonymous: readable by id, as before keys existed ------------------------
    r = loc.http.post(f"{q}/team-a/public/echo", json={"p": 1})
    p_rid = r.json()["request_id"]
    wait_until(lambda: loc.http.get(f"{q}/team-a/public/requests/{p_rid}/status").json()["status"] == "COMPLETED",
               30, what="the public request")
    assert loc.http.get(f"{q}/team-a/public/requests/{p_rid}", headers=key_header(b_key)).status_code == 200

    # The refusals are counted.
    metrics = loc.http.get(f"{loc.admin_url}/metrics").text
    assert 'fal_auth_refused_total{reason="unauthenticated"}' in metrics
    assert 'fal_auth_refused_total{reason="forbidden"}' in metrics


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def test_tokens_as_fal_client_fetches_them(make_local, point_fal):
    """POST /tokens/ (fal_client's own call) with a key: a JWT for the named app,
    accepted as Bearer and as ?fal_jwt_token=, refused for other apps, forged or
    expired; /tokens/ itself needs a key."""
    kdoc, fal_key = falkey("rt", "team-a")
    loc = make_local([
        function("echo", "team-a", minReplicas=1),
        function("other", "team-a", minReplicas=1),
        kdoc,
    ])
    point_fal(loc)
    loc.wait_ready("team-a/echo", 1)
    client = fal_client.SyncClient(key=fal_key)
    token = client._get_realtime_token("team-a/echo")
    header, claims, _ = token.split(".")
    assert json.loads(b64url_decode(header))["alg"] == "EdDSA"
    jwks = loc.http.get(f"{loc.run_url}/.well-known/jwks.json").json()
    assert json.loads(b64url_decode(header))["kid"] in {k["kid"] for k in jwks["keys"]}
    assert json.loads(b64url_decode(claims))["apps"] == ["echo"]

    echo = f"{loc.run_url}/team-a/echo/echo"
    r = loc.http.post(echo, json={}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert "authorization" not in {k.lower() for k in r.json()["headers"]}
    r = loc.http.post(f"{echo}?fal_jwt_token={token}&keep=1", json={})
    assert r.status_code == 200, r.text
    assert r.json()["query"] == "keep=1", r.json()
    assert_refused(loc.http.post(f"{loc.run_url}/team-a/other/echo", json={},
                                 headers={"Authorization": f"Bearer {token}"}), 403, "opens only echo")
    # Forged: the claims changed after signing.
    fake = json.loads(b64url_decode(claims))
    fake["apps"] = ["other"]
    forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(fake).encode()).decode().rstrip("="), token.split(".")[2]])
    assert_refused(loc.http.post(f"{loc.run_url}/team-a/other/echo", json={},
                                 headers={"Authorization": f"Bearer {forged}"}), 401, "signature")
    # Expired.
    short = loc.http.post(f"{loc.run_url}/tokens/", json={"allowed_apps": ["echo"], "token_expiration": 1},
                          headers=key_header(fal_key)).json()
    wait_until(lambda: loc.http.post(echo, json={}, headers={"Authorization": f"Bearer {short}"}).status_code == 401,
               10, what="the 1 s token to expire")
    # /tokens/ needs a key, and a good body.
    assert_refused(loc.http.post(f"{loc.run_url}/tokens/", json={"allowed_apps": ["echo"]}), 401)
    assert_refused(loc.http.post(f"{loc.run_url}/tokens/", json={"allowed_apps": ["echo"]},
                                 headers={"Authorization": f"Bearer {token}"}), 401, "issued for a key")
    r = loc.http.post(f"{loc.run_url}/tokens/", json={"allowed_apps": []}, headers=key_header(fal_key))
    assert r.status_code == 400 and "allowed_apps" in r.json()["detail"]


def test_one_rate_budget_across_two_gateways(make_local):
    """A key's rate is counted in Redis: two gateways (two `fal-operator local` on one
    Redis) spend one budget; 429 carries Retry-After, and waiting it out works; another
    key is untouched."""
    slow_doc, slow_key = falkey("slow", "team-a", rateLimit={"requestsPerSecond": 0.5, "burst": 3})
    free_doc, free_key = falkey("free", "team-a")
    manifest = [function("echo", "team-a"), slow_doc, free_doc]
    one, two = make_local(manifest), make_local(manifest)
    rid = uuid.uuid4()
    paths = [f"{g.queue_url}/team-a/echo/requests/{rid}/status" for g in (one, two, one)]
    # Three (the burst) pass, spread over both gateways: unknown id, so 404, not 429.
    for p in paths:
        assert one.http.get(p, headers=key_header(slow_key)).status_code == 404
    r = two.http.get(paths[1], headers=key_header(slow_key))
    assert_refused(r, 429, "over its rate limit")
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 2, r.headers
    assert one.http.get(paths[0], headers=key_header(free_key)).status_code == 404
    time.sleep(wait)
    assert two.http.get(paths[1], headers=key_header(slow_key)).status_code == 404


def test_open_without_keys_and_closed_with_require_auth(make_local):
    """No FalKey: local stays open and says so in one warning line; --require-auth
    closes it (only public functions answer)."""
    open_ = make_local([function("echo", "team-a", minReplicas=1)])
    open_.wait_ready("team-a/echo", 1)
    assert open_.http.post(f"{open_.run_url}/team-a/echo/test", json={}).status_code == 200
    warnings = [line for line in open_.log_tail(400).splitlines() if "no FalKey declared" in line]
    assert len(warnings) == 1, open_.log_tail()
    closed = make_local([function("echo", "team-a", minReplicas=1),
                         function("pub", "team-a", minReplicas=1, auth="public")], "--require-auth")
    closed.wait_ready("team-a/pub", 1)
    assert_refused(closed.http.post(f"{closed.run_url}/team-a/echo/test", json={}), 401, "needs an API key")
    assert closed.http.post(f"{closed.run_url}/team-a/pub/test", json={}).status_code == 200
    assert "no FalKey declared" not in closed.log_tail(400)


RAW_APP = [sys.executable, "-u", str(REPO / "tests" / "e2e" / "raw_app.py")]


def raw_call(loc, path: str, *fields: str) -> tuple[int, bytes]:
    """One request on its own connection: (status, body). `X-Case` keeps its case
    through the fast lane, which forwards field lines as sent; hyper's path lowers it."""
    host, port = loc.run_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: h\r\nX-Case: 1\r\n" + "".join(f + "\r\n" for f in fields)
                   + "Content-Length: 2\r\nConnection: close\r\n\r\nhi").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_keyed_calls_take_the_fast_lane_and_leave_their_key_there(make_local):
    """A sync call with a key that opens the function goes through the gateway's fast
    lane (field lines as sent) without its Authorization field; every call the key
    check refuses, or that a rate limit governs, is answered by routing.rs as before."""
    a_doc, a_key = falkey("ci", "team-a")
    b_doc, b_key = falkey("ci", "team-b")
    rated_doc, rated_key = falkey("rated", "team-a", rateLimit={"requestsPerSecond": 100, "burst": 100})
    loc = make_local([function("raw", "team-a", command=RAW_APP, minReplicas=1, maxReplicas=1),
                      a_doc, b_doc, rated_doc])
    loc.wait_ready("team-a/raw", 1)
    status, head = raw_call(loc, "/team-a/raw/head", f"Authorization: Key {a_key}")
    assert status == 200 and head.startswith(b"POST /head HTTP/1.1\r\n"), head
    assert b"\r\nX-Case: 1\r\n" in head, head  # the lane took it
    assert b"authorization" not in head.lower() and a_key.split(":")[1].encode() not in head
    # A rate-limited key: routing.rs (the budget is counted there), key dropped too.
    status, head = raw_call(loc, "/team-a/raw/head", f"authorization: key {rated_key}")
    assert status == 200 and b"\r\nx-case: 1\r\n" in head and b"authorization" not in head.lower(), head
    # Refusals, each with its detail.
    wrong = a_key.split(":")[0] + ":" + "0" * 64
    for fields, status, words in [
        ([f"Authorization: Key {wrong}"], 401, b"wrong secret"),
        ([f"Authorization: Key {a_key}", f"Authorization: Key {a_key}"], 401, b"more than one"),
        ([f"Authorization: Key {b_key}"], 403, b"team-b"),
        (["Authorization: Bearer not-a-token"], 401, b""),
        ([], 401, b"API key"),
    ]:
        got, body = raw_call(loc, "/team-a/raw/head", *fields)
        assert got == status and words in body, (fields, got, body)
        assert a_key.split(":")[1].encode() not in body
