#!/usr/bin/env python3
"""The example app (examples/app.py) as a pod runs it under the test kubelet.

The test kubelet's working directory for containers without `workingDir` is this
directory, so a FalFunction with `command: [python3, app.py]` runs this file. The
example app listens on 127.0.0.1 only; in a pod the kubelet probes the pod's own
address (as a real kubelet does), so here the same server listens on every address
of the pod's network namespace (its loopback and its pod IP, nothing else).
"""

import importlib.util
import os
import sys
import threading
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "app.py"
spec = importlib.util.spec_from_file_location("example_app", EXAMPLE)
example = importlib.util.module_from_spec(spec)
sys.modules["example_app"] = example
spec.loader.exec_module(example)
if os.environ.get("APP_OVERLAP_DIR"):
    # Record how many calls run at once (tests/e2e/overlap_app.py), per pod.
    sys.path.insert(0, str(EXAMPLE.parents[1] / "tests" / "e2e"))
    import overlap_app

    overlap_app.install(example.Handler,
                        Path(os.environ["APP_OVERLAP_DIR"]) / f"{os.environ.get('HOSTNAME', 'pod')}.json")


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = example.Server(("0.0.0.0", port), example.Handler)
    if os.environ.get("APP_EXIT_WITH_PARENT", "1") != "0":
        threading.Thread(target=example._exit_with_parent, daemon=True).start()
    print(f"listening on http://0.0.0.0:{port} (pod {os.environ.get('HOSTNAME', '?')})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
