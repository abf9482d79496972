"""The example app with a journal of its runs, for the fault tests.

Run as `python fault_app.py` (the sidecar's app command): examples/app.py, except

  POST /slow?seconds=S  sleeps S s; stops early with 499 when a cancel for its
                        x-fal-request-id arrives (POST .../cancel) or when the caller
                        hangs up (the sidecar dropped the call). Every run is journaled.
  GET  /runs            the journal: [{"id", "port", "start", "end", "outcome"}], times
                        from time.time() (one clock for every app on the host), end and
                        outcome null while the run goes on; outcome "done", "cancelled"
                        or "disconnected"
  POST .../cancel       applies to the run of that request going on, if any (ignored
                        otherwise; examples/app.py remembers cancelled ids forever, so
                        a request run again in the same app would be answered 499)

and every response carries `x-app-port: $PORT`, so a stored result names the replica
whose app produced it.
"""

from __future__ import annotations

import importlib.util
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "examples" / "app.py"


def _hung_up(sock: socket.socket) -> bool:
    """True when the peer closed its side (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def main() -> None:
    spec = importlib.util.spec_from_file_location("fal_example_app", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    port = os.environ.get("PORT", "8000")
    runs: list[dict] = []
    runs_lock = threading.Lock()
    send, route = mod.Handler._send, mod.Handler._route

    def _send(self, status, body, content_type="application/json", headers=None):
        headers = dict(headers or {})
        headers["x-app-port"] = port
        return send(self, status, body, content_type, headers)

    def _route(self, method, path, raw_query, body, text, request_id):
        if method == "GET" and path == "/runs":
            with runs_lock:
                return self._send(200, list(runs))
        if method == "POST" and path.endswith("/cancel") and len(path) > len("/cancel"):
            # A cancel is for the run going on (as in fal's runtime); one for a request
            # that does not run here is ignored.
            with runs_lock:
                going = any(r["id"] == request_id and r["end"] is None for r in runs)
            if going:
                with mod._lock:
                    mod._cancelled.add(request_id)
            print(f"cancel: {request_id} ({'running' if going else 'not running: ignored'})", flush=True)
            return self._send(200, {"cancelled": request_id, "running": going})
        if not (method == "POST" and path == "/slow"):
            return route(self, method, path, raw_query, body, text, request_id)
        seconds = float(self._param("seconds", 1))
        run = {"id": request_id, "port": int(port), "start": time.time(), "end": None, "outcome": None}
        with runs_lock:
            runs.append(run)
        print(f"slow: {request_id} starting {seconds:g} s", flush=True)
        deadline = time.monotonic() + seconds
        outcome = "done"
        while time.monotonic() < deadline:
            with mod._lock:
                if request_id is not None and request_id in mod._cancelled:
                    outcome = "cancelled"
            if outcome == "done" and _hung_up(self.connection):
                outcome = "disconnected"
            if outcome != "done":
                break
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        # A cancel was for this run: a later run of the same request (claimed here
        # again after a lease expired) must not see it.
        with mod._lock:
            mod._cancelled.discard(request_id)
        with runs_lock:
            run["end"], run["outcome"] = time.time(), outcome
        print(f"slow: {request_id} {outcome}", flush=True)
        if outcome == "done":
            return self._send(200, {"slept": seconds})
        return self._send(499, {"detail": outcome})

    mod.Handler._send = _send
    mod.Handler._route = _route
    mod.main()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
