"""The real npm @fal-ai/client (tests/js) against the sidecar: subscribe with polling
and logs, streaming mode (status SSE), submit/status/result, cancel, and fal.run
through the run host."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO, free_port

JS = REPO / "tests" / "js"


def test_npm_fal_client(make_sidecar):
    if not (JS / "node_modules" / "@fal-ai" / "client").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `npm ci --prefix tests/js` (scripts/test.sh does)")
    node = shutil.which("node")
    assert node, "node is needed for the npm client test"
    run_port = free_port()
    sc = make_sidecar("--run-host-listen", f"127.0.0.1:{run_port}")
    proc = subprocess.run(
        [node, str(JS / "client_check.mjs"), sc.queue_url, f"http://127.0.0.1:{run_port}"],
        capture_output=True, text=True, timeout=120, cwd=JS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["polling"]["data"] == {"printed": 3}
    assert out["polling"]["requestId"]
    assert "log line 0" in out["polling"]["logs"], out["polling"]
    assert "COMPLETED" in out["polling"]["statuses"]
    assert out["streaming"] == {"message": "Hello from fal-serverless!", "input": {"x": 1}}
    assert out["status"] == "COMPLETED"
    assert out["result"]["json"] == {"y": 2} and out["result"]["path"] == "/echo"
    first, retried = out["idempotency"]
    assert first and first == retried, out["idempotency"]
    assert out["cancelled"]["status"] == "COMPLETED"
    assert out["cancelled"].get("error_type") == "request_cancelled", out["cancelled"]
    assert out["run"] == {"message": "Hello from fal-serverless!", "input": {"z": 3}}
