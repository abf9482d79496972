"""Idempotency-Key on submit (our extension, see PROTOCOL notes in README): a client that
retries a submit gets the first request back and the app runs it once.

Every case counts the app's calls with /flaky?key=K&fail=0 (the example app counts per
key and answers 200).
"""

from __future__ import annotations

import os
import threading
import uuid

import httpx
import pytest

from helpers import HTTP_TIMEOUT, new_key, wait_until
from redis_fixture import REDIS_SERVER, RedisServer, app_cmd, redis_args, signing_key


def flaky_path(key: str) -> str:
    return f"flaky?key={key}&fail=0"


def submit_c(sc, key: str, idem: str | None, body=None, **kw) -> httpx.Response:
    headers = {"Idempotency-Key": idem} if idem is not None else {}
    return sc.submit("flaky", {"n": 1} if body is None else body, headers=headers,
                     params={"key": key, "fail": "0"}, **kw)


def app_calls_total(sidecars, key: str) -> int:
    return sum(sc.app_calls(key) for sc in sidecars)


def test_same_key_same_request_is_one_request(sidecar):
    key, idem = new_key("idem"), str(uuid.uuid4())
    first = submit_c(sidecar, key, idem)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    again = submit_c(sidecar, key, idem)
    assert again.status_code == 200, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json(), "the same submit answer"
    assert again.headers["x-fal-request-id"] == first.json()["request_id"]

    rid = first.json()["request_id"]
    assert sidecar.wait_result(rid).status_code == 200
    # After completion the key still names the same request (within retention).
    late = submit_c(sidecar, key, idem)
    assert late.json()["request_id"] == rid
    assert late.headers.get("idempotent-replayed") == "true"
    assert sidecar.app_calls(key) == 1


def test_quoted_structured_field_key_is_the_same_key(sidecar):
    key, idem = new_key("idem"), f"q-{uuid.uuid4()}"
    a = submit_c(sidecar, key, idem)
    b = submit_c(sidecar, key, f'"{idem}"')
    assert a.status_code == b.status_code == 200
    assert a.json()["request_id"] == b.json()["request_id"]


def test_same_key_different_request_is_422(sidecar):
    key, idem = new_key("idem"), str(uuid.uuid4())
    first = submit_c(sidecar, key, idem, body={"n": 1})
    assert first.status_code == 200, first.text
    other_body = submit_c(sidecar, key, idem, body={"n": 2})
    assert other_body.status_code == 422, other_body.text
    detail = other_body.json()["detail"]
    assert "Idempotency-Key" in detail and first.json()["request_id"] in detail, detail
    other_endpoint = sidecar.submit("echo", {"n": 1}, headers={"Idempotency-Key": idem})
    assert other_endpoint.status_code == 422, other_endpoint.text
    other_query = submit_c(sidecar, new_key("idem"), idem, body={"n": 1})
    assert other_query.status_code == 422, other_query.text
    sidecar.wait_result(first.json()["request_id"])
    assert sidecar.app_calls(key) == 1


def test_no_key_no_dedup(sidecar):
    key = new_key("idem")
    a = submit_c(sidecar, key, None)
    b = submit_c(sidecar, key, None)
    assert a.json()["request_id"] != b.json()["request_id"]
    for r in (a, b):
        sidecar.wait_result(r.json()["request_id"])
    assert sidecar.app_calls(key) == 2


@pytest.mark.parametrize("value,why", [
    ("", "empty"),
    ("x" * 256, "limit is 255"),
    ('"open', "quote"),
    ("caf\u00e9", "ASCII"),
])
def test_bad_keys_are_400(sidecar, value, why):
    r = sidecar.http.post(f"{sidecar.queue_url}/test/app/echo", json={},
                          headers={"Idempotency-Key": value.encode("utf-8")})
    assert r.status_code == 400, r.text
    assert why in r.json()["detail"], r.json()


def test_generations_a_and_b_submit_paths(sidecar):
    key, idem = new_key("idem"), str(uuid.uuid4())
    url = f"{sidecar.run_url}/fal/queue/submit/flaky?key={key}&fail=0"
    a = sidecar.http.post(url, json={"n": 1}, headers={"Idempotency-Key": idem})
    b = sidecar.http.post(url, json={"n": 1}, headers={"Idempotency-Key": idem})
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["request_id"] == b.json()["request_id"]
    assert b.headers.get("idempotent-replayed") == "true"
    different = sidecar.http.post(url, json={"n": 3}, headers={"Idempotency-Key": idem})
    assert different.status_code == 422, different.text
    sidecar.wait_result(a.json()["request_id"])
    assert sidecar.app_calls(key) == 1


def concurrent_submits(targets, key: str, idem: str, n: int = 20) -> list[httpx.Response]:
    """n submits of one request with one key, released at once, spread over `targets`."""
    barrier = threading.Barrier(n)
    out: list[httpx.Response | BaseException] = [None] * n  # type: ignore[list-item]

    def go(i: int) -> None:
        sc = targets[i % len(targets)]
        with httpx.Client(timeout=HTTP_TIMEOUT) as c:
            barrier.wait()
            try:
                out[i] = c.post(f"{sc.queue_url}/test/app/flaky", params={"key": key, "fail": "0"},
                                json={"n": 1}, headers={"Idempotency-Key": idem})
            except BaseException as e:  # noqa: BLE001 - reported below
                out[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in out:
        assert isinstance(r, httpx.Response), r
    return out  # type: ignore[return-value]


def check_one_request(responses: list[httpx.Response]) -> str:
    ids = set()
    conflicts = 0
    for r in responses:
        if r.status_code == 409:
            assert r.headers.get("retry-after"), r.headers
            assert "still being stored" in r.json()["detail"]
            conflicts += 1
        else:
            assert r.status_code == 200, r.text
            ids.add(r.json()["request_id"])
    assert len(ids) == 1, f"one request id for every caller, got {ids}"
    fresh = [r for r in responses if r.status_code == 200 and "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1, "exactly one submit stored the request"
    print(f"{len(responses)} concurrent submits: 1 stored, {len(responses) - 1 - conflicts} replayed, {conflicts} x 409")
    return ids.pop()


def test_twenty_concurrent_duplicates(sidecar):
    key, idem = new_key("idem"), str(uuid.uuid4())
    rid = check_one_request(concurrent_submits([sidecar], key, idem))
    sidecar.wait_result(rid)
    assert sidecar.app_calls(key) == 1


@pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason=f"redis-server not found ({REDIS_SERVER})")
def test_across_two_replicas_on_redis(make_sidecar, tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        sk = signing_key(tmp_path / "webhook.key")
        replicas = [
            make_sidecar(*redis_args(server, "--signing-key", str(sk)), name=f"replica{i}", app_cmd=app_cmd())
            for i in range(2)
        ]
        key, idem = new_key("idem"), str(uuid.uuid4())
        rid = check_one_request(concurrent_submits(replicas, key, idem))
        # Sequential retries on either replica: the same id.
        for sc in replicas:
            r = submit_c(sc, key, idem)
            assert r.json()["request_id"] == rid
        done = replicas[0].wait_result(rid)
        assert done.status_code == 200, done.text
        wait_until(lambda: app_calls_total(replicas, key) >= 1, what="the app to see the request")
        assert app_calls_total(replicas, key) == 1
        # A different request under that key is refused on the other replica too.
        r = submit_c(replicas[1], key, idem, body={"n": 9})
        assert r.status_code == 422, r.text
    finally:
        server.close()


def test_fal_client_sends_the_key_as_a_custom_header(sidecar, monkeypatch):
    """The official client's `headers=` argument carries the key: no client change."""
    import fal_client
    import fal_client.client as fal_client_module

    monkeypatch.setenv("FAL_KEY", "e2e-key-id:e2e-key-secret")
    monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{sidecar.queue_url}/")
    monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{sidecar.run_url}/")
    client = fal_client.SyncClient()
    try:
        marker, idem = new_key("idem"), str(uuid.uuid4())
        handles = [
            client.submit("test/app", {"marker": marker}, path="echo", headers={"Idempotency-Key": idem})
            for _ in range(3)
        ]
        assert len({h.request_id for h in handles}) == 1
        assert handles[0].get()["json"] == {"marker": marker}
        seen = [e for e in sidecar.app_seen() if e["x-fal-request-id"] == handles[0].request_id]
        assert len(seen) == 1, seen
    finally:
        client._client.close()
