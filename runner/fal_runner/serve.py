"""Runs an `@isolated` function as a server: `python -m fal_runner serve FILE FUNCTION`.

The function either serves on its `exposed_port` itself (the seed: `app.run(port=8080)`),
or returns a WSGI app (Flask, …) or an ASGI app (FastAPI, Starlette; uvicorn must be in
the requirements), which is served here on $PORT.

$PORT is where the sidecar expects the app. In a pod it equals the exposed port; when
they differ (`fal-operator local` runs several replicas on one machine) a bind to the
exposed port is moved to $PORT, so the seed's hard-coded `app.run(port=8080)` works
unchanged.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


def remap_exposed_port(exposed: int, port: int) -> None:
    if exposed == port:
        return
    bind = socket.socket.bind

    def remapped(self, address):
        if isinstance(address, tuple) and len(address) >= 2 and address[1] == exposed:
            address = (address[0], port, *address[2:])
        return bind(self, address)

    socket.socket.bind = remapped


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 1024


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def load(path: str, function: str):
    spec = importlib.util.spec_from_file_location("__fal_app__", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"fal_runner: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__fal_app__"] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    fn = getattr(module, function, None)
    if fn is None:
        raise SystemExit(f"fal_runner: {path} has no function {function!r}")
    return getattr(fn, "isolated_function", fn)


def is_asgi(app) -> bool:
    call = app if inspect.isfunction(app) else getattr(app, "__call__", None)
    return inspect.iscoroutinefunction(call)


def serve_app(app, port: int) -> None:
    if is_asgi(app):
        try:
            import uvicorn
        except ImportError:
            raise SystemExit("fal_runner: the function returned an ASGI app; add uvicorn to its requirements") from None
        uvicorn.run(app, host="0.0.0.0", port=port, log_level="warning")
        return
    if not callable(app):
        raise SystemExit(f"fal_runner: the function returned {type(app).__name__}, not a WSGI or ASGI app")
    server = make_server("0.0.0.0", port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler)
    print(f"fal_runner: serving the returned app on port {port}", flush=True)
    server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m fal_runner serve FILE FUNCTION", file=sys.stderr)
        return 2
    path, function = argv
    port = int(os.environ.get("PORT", "8080"))
    exposed = int(os.environ.get("FAL_EXPOSED_PORT", str(port)))
    remap_exposed_port(exposed, port)
    fn = load(path, function)
    app = fn()
    if app is None:
        # A function that serves itself does not return while it serves.
        print(f"fal_runner: {function}() returned None: serve on exposed_port in its body, "
              "or return a WSGI/ASGI app to be served", file=sys.stderr, flush=True)
        return 1
    serve_app(app, port)
    return 0
