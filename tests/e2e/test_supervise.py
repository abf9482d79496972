"""`fal-sidecar run` supervises its app: an app that exits is restarted (same port,
backoff), readiness and direct calls say so meanwhile, queued requests wait for it,
a request that was running is run again a bounded number of times, and SIGTERM still
exits cleanly at any point.

The app is tests/e2e/crash_app.py: it crashes on demand, counts its starts in a file
and can be held before it listens again (so the test, not a timer, decides how long
the app stays down)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from helpers import Sidecar, SidecarExited, wait_until

CRASH_APP = Path(__file__).with_name("crash_app.py")
# Quick restarts: 0.2 s doubling to 1 s.
FAST_RESTART = ["--restart-delay", "0.2", "--restart-delay-max", "1"]


@pytest.fixture
def crashy(make_sidecar, tmp_path):
    """make_sidecar with crash_app.py behind it; returns (sidecar, state dir)."""

    def factory(*args: str, start: bool = True, setup=None) -> tuple[Sidecar, Path]:
        state = tmp_path / f"app-state-{len(list(tmp_path.glob('app-state-*')))}"
        state.mkdir()
        if setup:
            setup(state)
        sc = make_sidecar(
            *args,
            start=start,
            app_cmd=[sys.executable, "-u", str(CRASH_APP)],
            env={"CRASH_APP_DIR": str(state)},
        )
        return sc, state

    return factory


def app_pids(state: Path) -> list[int]:
    try:
        return [int(x) for x in (state / "starts").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def readyz(sc: Sidecar):
    return sc.http.get(f"{sc.admin_url}/readyz")


def metric(sc: Sidecar, name: str) -> float:
    text = sc.http.get(f"{sc.admin_url}/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in metrics:\n{text[:3000]}"
    return float(m.group(1))


def crash_directly(sc: Sidecar):
    """A direct call that kills the app: answered (not hung) with a clear error."""
    r = sc.http.post(f"{sc.run_url}/crash")
    assert r.status_code == 502, (r.status_code, r.text)
    body = r.json()
    assert body["error_type"] == "runner_disconnected", body
    assert "exited" in body["detail"] and "restarted" in body["detail"], body
    assert r.headers.get("retry-after"), r.headers
    return r


def test_poison_request_fails_after_bounded_attempts_and_the_app_keeps_serving(crashy):
    sc, state = crashy(*FAST_RESTART)
    rid = sc.submit_ok("crash")["request_id"]
    status = sc.wait_completed(rid, timeout=90)
    assert status.get("error_type") == "runner_disconnected", status
    r = sc.result(rid)
    assert r.status_code == 503, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert "the app exited (exit status: 1) while running this request" in detail, detail
    assert "attempt 3 of 3" in detail, detail

    # Three crashes, three restarts; the sidecar never went away.
    sc.wait_ready(timeout=30)
    assert sc.running
    assert len(app_pids(state)) == 4, app_pids(state)
    assert metric(sc, "fal_app_restarts_total") == 3
    assert metric(sc, "fal_app_up") == 1

    # Other requests are served by the restarted app, queued and direct.
    ok = sc.submit_ok("ok")["request_id"]
    r = sc.wait_result(ok, timeout=30)
    assert r.status_code == 200 and r.json()["starts"] == 4, r.text
    r = sc.http.post(f"{sc.run_url}/ok")
    assert r.status_code == 200, r.text
    assert "the app exited; restarting it" in sc.log_text()


def test_app_down_readiness_direct_calls_and_queued_requests(crashy):
    sc, state = crashy(*FAST_RESTART)
    assert readyz(sc).status_code == 200
    (state / "hold").touch()  # the restarted app waits before it listens
    crash_directly(sc)

    # Restarted (second start) but not listening: readiness says why.
    wait_until(lambda: len(app_pids(state)) == 2, timeout=30, what="the app to be restarted")

    def restarting():
        r = readyz(sc)
        return r if r.status_code == 503 and r.json()["app"]["state"] == "starting" else None

    r = wait_until(restarting, timeout=30, what="/readyz to report the app starting")
    body = r.json()
    assert body["error_type"] == "app_restarting", body
    assert "restarting" in body["detail"] and "exit status: 1" in body["detail"], body
    assert body["app"]["restarts"] == 1, body
    assert metric(sc, "fal_app_up") == 0

    # Direct calls: answered at once, 503 + Retry-After, saying why.
    r = sc.http.post(f"{sc.run_url}/ok", json={})
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.json()["error_type"] == "app_restarting", r.text
    assert "restarting" in r.json()["detail"], r.text
    assert int(r.headers["retry-after"]) >= 1, r.headers

    # The queue keeps accepting; the request waits (no worker claims while the app is down).
    rid = sc.submit_ok("ok")["request_id"]
    st = sc.status(rid).json()
    assert st["status"] == "IN_QUEUE", st

    (state / "hold").unlink()
    sc.wait_ready(timeout=30)
    r = sc.wait_result(rid, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["starts"] == 2, r.text
    assert sc.http.post(f"{sc.run_url}/ok").status_code == 200


def test_request_that_crashes_the_app_once_completes_on_retry(crashy):
    sc, state = crashy(*FAST_RESTART)
    rid = sc.submit_ok("crash_once", params={"key": "a"})["request_id"]
    r = sc.wait_result(rid, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["starts"] == 2, r.text
    assert sc.running


def test_no_retry_request_fails_at_the_first_crash(crashy):
    sc, state = crashy(*FAST_RESTART)
    rid = sc.submit_ok("crash_once", params={"key": "b"},
                       headers={"X-Fal-No-Retry": "1"})["request_id"]
    sc.wait_completed(rid, timeout=60)
    r = sc.result(rid)
    assert r.status_code == 503, r.text
    assert "X-Fal-No-Retry" in r.json()["detail"], r.text


def test_restarts_that_never_listen_end_run_with_a_message(crashy):
    sc, state = crashy("--restart-delay", "0.1", "--max-restart-failures", "2",
                       setup=lambda s: (s / "fail_after").write_text("1"))
    crash_directly(sc)
    sc.proc.wait(timeout=60)
    assert sc.proc.returncode not in (0, None)
    log = sc.log_text()
    assert "the app could not be restarted: 2 restarts in a row failed" in log, log[-3000:]
    assert "--max-restart-failures" in log
    assert len(app_pids(state)) == 3  # the first start and two failed restarts
    assert not any(alive(p) for p in app_pids(state))


def test_broken_command_still_exits_at_once(tmp_path):
    sc = Sidecar(tmp_path / "broken", [], name="broken-app",
                 app_cmd=[str(tmp_path / "no-such-app")])
    try:
        with pytest.raises(SidecarExited):
            sc.start(timeout=30)
        assert sc.proc.returncode != 0
        assert "cannot start the app" in sc.log_text(), sc.log_text()
    finally:
        sc.close()


def test_sigterm_during_backoff_exits_zero_without_leftovers(crashy):
    sc, state = crashy("--restart-delay", "60")
    crash_directly(sc)

    def down():
        r = readyz(sc)
        return r.status_code == 503 and r.json()["app"]["state"] == "down"

    wait_until(down, timeout=30, what="/readyz to report the app down")
    assert "next start in" in readyz(sc).json()["detail"]
    assert sc.terminate(timeout=20) == 0
    pids = app_pids(state)
    assert len(pids) == 1 and not alive(pids[0]), pids


def test_sigterm_while_the_app_restarts_stops_it(crashy):
    sc, state = crashy(*FAST_RESTART)
    (state / "hold").touch()
    crash_directly(sc)
    wait_until(lambda: len(app_pids(state)) == 2, timeout=30, what="the app to be restarted")
    held = app_pids(state)[1]
    assert alive(held)
    assert sc.terminate(timeout=20) == 0
    wait_until(lambda: not alive(held), timeout=10, what="the held app to be gone")


def test_restart_time(crashy, capsys):
    """Not a bound, a measurement: crash → ready again, with the default 1 s restart
    delay and with none (the restart's own cost)."""
    lines = []
    for args in ([], ["--restart-delay", "0"]):
        sc, state = crashy(*args)
        t0 = time.monotonic()
        crash_directly(sc)
        sc.wait_ready(timeout=60)
        took = time.monotonic() - t0
        down = re.findall(r"the app is back.*?down_s=([0-9.]+)", sc.log_text())
        assert len(down) == 1, sc.log_text()[-2000:]
        lines.append(f"restart-delay {args[1] if args else '1 (default)'}: crash -> /readyz 200 "
                     f"{took:.2f} s (the sidecar's own count, exit -> listening: {float(down[0]):.2f} s)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
