"""`fal-sidecar run --keys FILE` (issue 15): the standalone sidecar with API keys —
every listener checks them, the webhook names the tenant, and an edited keys file
takes effect without a restart (a revoked key is refused within 2 s)."""

from __future__ import annotations

import hashlib
import secrets
import yaml
from helpers import free_port, wait_until


def write_keys(path, *keys: tuple[str, str, str]) -> None:
    """FalKey documents for (name, namespace, secret) — key id = name."""
    docs = [{
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalKey",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"keyId": name, "secretSha256": hashlib.sha256(secret.encode()).hexdigest()},
    } for name, ns, secret in keys]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.replace(path)


def test_keys_file_guards_every_listener_and_reloads(make_sidecar, make_receiver, tmp_path):
    keys = tmp_path / "keys.yaml"
    s1, s2 = secrets.token_hex(16), secrets.token_hex(16)
    write_keys(keys, ("alice", "team-a", s1), ("bob", "team-b", s2))
    rh_port = free_port()
    sc = make_sidecar("--keys", str(keys), "--function", "team-a/app",
                      "--run-host-listen", f"127.0.0.1:{rh_port}")
    alice = {"Authorization": f"Key alice:{s1}"}
    bob = {"Authorization": f"Key bob:{s2}"}
    rh = f"http://127.0.0.1:{rh_port}"

    # Without a key: refused on the run API, the per-app queue, the queue host and the
    # run host; the JWKS and the probes stay open.
    for method, url in [("POST", f"{sc.run_url}/test"), ("POST", f"{sc.run_url}/fal/queue/submit/test"),
                        ("POST", f"{sc.queue_url}/team-a/app/test"), ("POST", f"{rh}/team-a/app/test")]:
        r = sc.http.request(method, url, json={})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Key", (url, r.text)
    assert sc.http.get(sc.jwks_url).status_code == 200
    assert sc.http.get(f"{sc.admin_url}/readyz").status_code == 200
    # Another namespace's key: the function is private to team-a.
    r = sc.http.post(f"{sc.run_url}/test", json={}, headers=bob)
    assert r.status_code == 403 and "private to namespace" in r.json()["detail"], r.text
    # With alice's key: every path works, and the key does not reach the app.
    r = sc.http.post(f"{sc.run_url}/echo", json={"a": 1}, headers=alice)
    assert r.status_code == 200 and "authorization" not in r.json()["headers"], r.text
    assert sc.http.post(f"{rh}/team-a/app/test", json={}, headers=alice).status_code == 200

    # The webhook of a keyed submit names the tenant; only the tenant reads it.
    rcv = make_receiver(sc)
    r = sc.http.post(f"{sc.queue_url}/team-a/app/echo", json={"w": 1}, headers=alice,
                     params={"fal_webhook": rcv.url("/t")})
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    d = rcv.wait_for(rid)
    assert d.headers["x-fal-webhook-user-id"] == "team-a"
    assert sc.http.get(f"{sc.queue_url}/team-a/app/requests/{rid}", headers=alice).status_code == 200

    # A token of /tokens/ works as a Bearer.
    t = sc.http.post(f"{sc.run_url}/tokens/", json={"allowed_apps": ["app"]}, headers=alice)
    assert t.status_code == 200, t.text
    assert sc.http.post(f"{sc.run_url}/test", json={}, headers={"Authorization": f"Bearer {t.json()}"}).status_code == 200

    # Revoke alice by rewriting the file: refused within 2 s, without a restart.
    write_keys(keys, ("bob", "team-b", s2))
    wait_until(lambda: sc.http.post(f"{sc.run_url}/test", json={}, headers=alice).status_code == 401,
               2.5, interval=0.05, what="the revoked key to be refused")
    r = sc.http.post(f"{sc.run_url}/test", json={}, headers=alice)
    assert "unknown key id" in r.json()["detail"] and s1 not in r.text
    # A broken file keeps the keys already loaded.
    keys.write_text("kind: FalKey\nspec: [not, a, spec\n")
    r = sc.http.post(f"{sc.run_url}/test", json={}, headers=bob)
    assert r.status_code == 403  # bob still known (403, not 401)
