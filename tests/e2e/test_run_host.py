"""The optional run host (`--run-host-listen`, fal.run style): synchronous calls by
endpoint id, as `fal_client.run` makes them, and the `serve` mode in front of an app
that runs on its own."""

from __future__ import annotations

import subprocess
import sys

import fal_client
import fal_client.client as fal_client_module
import httpx

from helpers import APP, SIDECAR_BIN, free_port, wait_until


def test_fal_client_run_through_the_run_host(make_sidecar, monkeypatch):
    port = free_port()
    sc = make_sidecar("--run-host-listen", f"127.0.0.1:{port}")
    run_url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("FAL_KEY", "id:secret")
    monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{run_url}/")
    monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{sc.queue_url}/")
    client = fal_client.SyncClient()
    try:
        out = client.run("me/my-app/test", arguments={"prompt": "hi"})
    finally:
        client._client.close()
    assert out == {"message": "Hello from fal-serverless!", "input": {"prompt": "hi"}}

    # Namespaced ids and query strings reach the app's own path.
    r = httpx.post(f"{run_url}/workflows/me/flow/echo/deep?x=1", json={"a": 1})
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/echo/deep"
    assert r.json()["query"] in ("x=1", {"x": ["1"]}, {"x": "1"})
    r = httpx.post(f"{run_url}/only-owner")
    assert r.status_code == 404 and "detail" in r.json()


def test_serve_mode_in_front_of_a_separate_app(tmp_path):
    app_port, listen, queue, admin = free_port(), free_port(), free_port(), free_port()
    app = subprocess.Popen([sys.executable, "-u", str(APP)], env={"PORT": str(app_port), "PATH": "/usr/bin:/bin"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        "FAL_SIDECAR_UPSTREAM": f"http://127.0.0.1:{app_port}",
        "FAL_SIDECAR_LISTEN": f"127.0.0.1:{listen}",
        "FAL_SIDECAR_QUEUE_LISTEN": f"127.0.0.1:{queue}",
        "FAL_SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "FAL_SIDECAR_DATA_DIR": str(tmp_path / "data"),
    }
    side = subprocess.Popen([str(SIDECAR_BIN), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200, timeout=20, what="readyz")
        sub = httpx.post(f"http://127.0.0.1:{queue}/me/app/test", json={"n": 1}).json()
        res = wait_until(lambda: (r := httpx.get(sub["response_url"])).status_code == 200 and r, timeout=20)
        assert res.json()["input"] == {"n": 1}
        # serve allows no loopback webhooks by default
        r = httpx.post(f"http://127.0.0.1:{queue}/me/app/test", params={"fal_webhook": "http://127.0.0.1:9/x"})
        assert r.status_code == 400 and "loopback" in r.json()["detail"]
        # the app going away makes readiness fail, not the sidecar
        app.terminate()
        app.wait(10)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 503, timeout=10)
        r = httpx.post(f"http://127.0.0.1:{listen}/test")
        assert r.status_code == 502 and "detail" in r.json()
        side.terminate()
        assert side.wait(20) == 0
    finally:
        for p in (side, app):
            if p.poll() is None:
                p.kill()
