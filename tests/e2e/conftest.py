"""Fixtures for the fal-sidecar end-to-end tests.

Every test runs real processes on loopback: `fal-sidecar run` (env FAL_SIDECAR_BIN,
default <repo>/target/debug/fal-sidecar; build it with `cargo build -p fal-sidecar`
first) with examples/app.py behind it, webhook receivers, and the PyPI fal-client.

Run:  python -m pytest tests/e2e
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wallclock  # noqa: E402  (tests/wallclock.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (  # noqa: E402
    APP,
    FAST_APP_RETRY,
    FAST_WEBHOOK_RETRY,
    SIDECAR_BIN,
    Sidecar,
)
from webhook_receiver import WebhookReceiver  # noqa: E402

TEST_TIMEOUT = float(os.environ.get("E2E_TEST_TIMEOUT", "60"))

# Flags every "ordinary" sidecar gets: fast retry schedules, enough workers.
BASE_FLAGS = [
    "--webhook-retry-delays", FAST_WEBHOOK_RETRY,
    "--app-retry-delays", FAST_APP_RETRY,
]


# -- session guard: the binary must exist ---------------------------------

@pytest.fixture(scope="session", autouse=True)
def _sidecar_binary():
    if not SIDECAR_BIN.is_file() or not os.access(SIDECAR_BIN, os.X_OK):
        pytest.exit(
            f"fal-sidecar binary not found or not executable at {SIDECAR_BIN}. "
            "Build it first (`cargo build -p fal-sidecar`) or set FAL_SIDECAR_BIN.",
            returncode=3,
        )
    try:
        help_text = subprocess.run(
            [str(SIDECAR_BIN), "run", "--help"], capture_output=True, text=True, timeout=10
        )
        out = help_text.stdout + help_text.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.exit(f"cannot run {SIDECAR_BIN} run --help: {exc!r}", returncode=3)
    if "--queue-listen" not in out:
        pytest.exit(
            f"{SIDECAR_BIN} does not look like a fal-sidecar with a `run` subcommand "
            f"(`run --help` does not mention --queue-listen; exit {help_text.returncode}):\n{out[:2000]}",
            returncode=3,
        )
    assert APP.is_file(), APP
    return out


@pytest.fixture(scope="session")
def sidecar_help(_sidecar_binary) -> str:
    return _sidecar_binary


# -- per-test wall-clock guard (no pytest-timeout in requirements) ---------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with wallclock.limit(TEST_TIMEOUT, "E2E_TEST_TIMEOUT"):
        yield


# -- sidecar logs in failure reports ----------------------------------------

def _attach(node, sidecar: Sidecar) -> None:
    offset = len(sidecar.log_text())
    node.__dict__.setdefault("_e2e_sidecars", []).append((sidecar, offset))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for sidecar, offset in item.__dict__.get("_e2e_sidecars", []):
            text = sidecar.log_text()[offset:]
            if len(text) > 30000:
                text = "...\n" + text[-30000:]
            rep.sections.append((f"{sidecar.name} output ({sidecar.log_path})", text or "(empty)"))


# -- sidecars -----------------------------------------------------------------

@pytest.fixture(scope="session")
def _shared_sidecar(tmp_path_factory):
    sc = Sidecar(
        tmp_path_factory.mktemp("shared-sidecar"),
        [*BASE_FLAGS, "--max-concurrency", "8"],
        name="shared-sidecar",
    )
    sc.start()
    yield sc
    sc.close()


@pytest.fixture
def sidecar(request, _shared_sidecar) -> Sidecar:
    """The session-wide sidecar (max-concurrency 8, fast retries). Tests must
    leave it idle (cancel what they start)."""
    if not _shared_sidecar.running:
        _shared_sidecar.start()
    _attach(request.node, _shared_sidecar)
    return _shared_sidecar


@pytest.fixture
def make_sidecar(request, tmp_path):
    """Factory for a dedicated sidecar: make_sidecar("--max-concurrency", "1")."""
    made: list[Sidecar] = []

    def factory(*extra_args: str, base_flags: bool = True, start: bool = True,
                name: str | None = None, **kw) -> Sidecar:
        args = [*(BASE_FLAGS if base_flags else []), *extra_args]
        sc = Sidecar(tmp_path / f"sidecar{len(made)}", args, name=name or f"sidecar{len(made)}", **kw)
        made.append(sc)
        _attach(request.node, sc)
        if start:
            sc.start()
        return sc

    yield factory
    for sc in made:
        sc.close()


@pytest.fixture
def serial_sidecar(make_sidecar) -> Sidecar:
    """A dedicated sidecar that runs one request at a time."""
    return make_sidecar("--max-concurrency", "1", name="serial-sidecar")


# -- webhook receivers --------------------------------------------------------

@pytest.fixture
def make_receiver():
    made: list[WebhookReceiver] = []

    def factory(sidecar: Sidecar, start: bool = True) -> WebhookReceiver:
        rcv = WebhookReceiver(lambda: sidecar.jwks_url)
        made.append(rcv)
        if start:
            rcv.start()
        return rcv

    yield factory
    for rcv in made:
        rcv.stop()


@pytest.fixture
def receiver(make_receiver, sidecar) -> WebhookReceiver:
    return make_receiver(sidecar)
