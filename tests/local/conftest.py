"""Fixtures for tests/local (test modules import helpers from `local_proc` and
tests/e2e's `helpers`, never from `conftest`: several suites run in one pytest session,
each with a conftest module of that name). The fixtures: a real `redis-server`, a real
`fal-operator local` (gateway + autoscaler + replicas as `fal-sidecar run`
processes) in front of the example app, all on loopback.

Binaries: FAL_OPERATOR_BIN and FAL_SIDECAR_BIN (scripts/test.sh exports both), else
<repo>/target/debug/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wallclock  # noqa: E402  (tests/wallclock.py)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))

from helpers import REPO, alive, descendants, free_port, wait_until  # noqa: E402,F401 (re-exported)
from redis_fixture import RedisServer  # noqa: E402
from local_proc import APP_CMD, OPERATOR_BIN, SIDECAR_BIN, Local, function  # noqa: E402,F401 (re-exported)

TEST_TIMEOUT = float(os.environ.get("E2E_TEST_TIMEOUT", "180"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with wallclock.limit(TEST_TIMEOUT, "E2E_TEST_TIMEOUT"):
        yield


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.close()


@pytest.fixture
def make_local(request, tmp_path, redis):
    made: list[Local] = []

    def factory(functions: list[dict], *extra: str, env: dict | None = None, start: bool = True) -> Local:
        loc = Local(tmp_path / f"local{len(made)}", redis, functions, *extra, env=env)
        made.append(loc)
        if start:
            loc.start()
        return loc

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for loc in made:
        if failed is not None and failed.failed:
            print(f"--- fal-operator local log ({loc.log_path}) ---\n{loc.log_tail(300)}")
        loc.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
