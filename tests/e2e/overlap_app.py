"""examples/app.py that records its own overlap: how many POSTs it was handling at once,
at most (`GET /overlap` → {"max": n, "now": k, "posts": total}; with a directory as
argv[1], also written to DIR/$PORT.json whenever the maximum grows). What a one-model
GPU app cannot afford is `max` > its maxConcurrency. A cancel notice (`POST …/cancel`)
is not a call and is not counted."""

import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "examples" / "app.py"


def install(handler, out: Path | None = None) -> None:
    """Counts the POSTs `handler` (examples/app.py's Handler) handles at once; serves
    `GET /overlap`; writes the state to `out` whenever the maximum grows."""
    lock = threading.Lock()
    state = {"now": 0, "max": 0, "posts": 0}
    handle = handler._handle

    def _handle(self):
        if self.command == "GET" and self.path.startswith("/overlap"):
            with lock:
                body = json.dumps(state).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        if self.command != "POST" or self.path.split("?")[0].endswith("/cancel"):
            return handle(self)
        with lock:
            state["now"] += 1
            state["posts"] += 1
            if state["now"] > state["max"]:
                state["max"] = state["now"]
                if out is not None:
                    out.write_text(json.dumps(state))
        try:
            return handle(self)
        finally:
            with lock:
                state["now"] -= 1

    handler._handle = _handle
    handler.do_GET = handler.do_POST = _handle


def main() -> None:
    spec = importlib.util.spec_from_file_location("fal_example_app", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = Path(sys.argv[1]) / f"{os.environ.get('PORT', '8000')}.json" if len(sys.argv) > 1 else None
    install(mod.Handler, out)
    mod.main()


if __name__ == "__main__":
    sys.exit(main())
