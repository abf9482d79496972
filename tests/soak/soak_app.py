"""examples/app.py for the soak: every answer it gives to a queued request (one with
`x-fal-request-id`) appends `<request id> <path> <port> <unix time>` to the log named
by argv[1], in one O_APPEND write (whole lines even with threads and replicas)."""

import importlib.util
import os
import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "examples" / "app.py"


def main(seen_log: str) -> None:
    spec = importlib.util.spec_from_file_location("fal_example_app", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    port = os.environ.get("PORT", "8000")
    original = mod.Handler._send
    fd = os.open(seen_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _send(self, status, body, content_type="application/json", headers=None):
        rid = self.headers.get("x-fal-request-id")
        if rid:
            path = self.path.split("?", 1)[0]
            os.write(fd, f"{rid} {path} {port} {time.time():.3f}\n".encode())
        return original(self, status, body, content_type, headers)

    mod.Handler._send = _send
    mod.main()


if __name__ == "__main__":
    main(sys.argv[1])
