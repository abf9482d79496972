"""Admin listener: /metrics (Prometheus text), /healthz, /readyz; app startup failures."""

from __future__ import annotations

import re
import sys

import pytest

from helpers import Sidecar, SidecarExited


def test_health_and_ready(sidecar):
    assert sidecar.http.get(f"{sidecar.admin_url}/healthz").status_code == 200
    assert sidecar.http.get(f"{sidecar.admin_url}/readyz").status_code == 200


def test_metrics_expose_fal_metrics(sidecar):
    rid = sidecar.submit_ok("echo", {})["request_id"]
    sidecar.wait_completed(rid)
    r = sidecar.http.get(f"{sidecar.admin_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    samples = [line for line in r.text.splitlines() if line and not line.startswith("#")]
    fal = [line for line in samples if line.startswith("fal_")]
    assert fal, f"no fal_ metrics in:\n{r.text[:2000]}"
    for line in fal:
        assert re.match(r"^fal_[a-zA-Z0-9_:]*(\{.*\})? [-+0-9.eEInfNa]+( \d+)?$", line), line
    assert any(line.startswith("# TYPE fal_") for line in r.text.splitlines())
    # something counts the request we just ran
    assert any(float(line.rsplit(" ", 1)[1]) > 0 for line in fal), fal


def test_app_that_dies_at_startup_fails_the_sidecar(tmp_path):
    sc = Sidecar(tmp_path / "dead", [], name="dead-app",
                 app_cmd=[sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(3)"])
    try:
        with pytest.raises(SidecarExited):
            sc.start(timeout=20)
        assert sc.proc.returncode != 0
        assert sc.log_text().strip(), "no message explaining the failure"
    finally:
        sc.close()
