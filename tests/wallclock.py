"""One wall-clock bound per test, shared by the suites' conftests (no pytest-timeout
in the requirements): SIGALRM raises TimeoutError in the test after `seconds`."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def limit(seconds: float, setting: str):
    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {seconds:g}s ({setting})")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
