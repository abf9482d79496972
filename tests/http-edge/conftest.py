"""Fixtures of the differential corpus (tests/http-edge): the reference servers (nginx,
Go's net/http) and ours (`fal-sidecar run`, `fal-operator local`), each started once
per module, all on loopback.

Binaries: FAL_SIDECAR_BIN and FAL_OPERATOR_BIN (scripts/test.sh exports both), else
<repo>/target/debug/. nginx: the distribution's package (scripts/test.sh installs it).
Go: optional (skipped when absent); its server is built once and cached under
$FAL_CLUSTER_CACHE/http-edge (default ~/.cache/fal-serverless/http-edge).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wallclock  # noqa: E402  (tests/wallclock.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers  # noqa: E402

TEST_TIMEOUT = float(os.environ.get("E2E_TEST_TIMEOUT", "180"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with wallclock.limit(TEST_TIMEOUT, "E2E_TEST_TIMEOUT"):
        yield


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    target = servers.SidecarTarget(tmp_path_factory.mktemp("edge-sidecar"))
    yield target
    target.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    target = servers.GatewayTarget(tmp_path_factory.mktemp("edge-gateway"))
    yield target
    target.close()
