"""The `fal_serverless` of the original fal-serverless, as far as a decorated file needs it
to run on this stack: `isolated(...)` marks a function and records its arguments. The
deploy flow (`fal-operator function serve`) reads those arguments from the file's syntax
tree without running it; the runner (`python -m fal_runner serve`) calls the function."""

from __future__ import annotations

import functools
from typing import Any, Callable

__all__ = ["isolated"]


def isolated(*args: Any, **options: Any) -> Callable:
    """`@isolated(requirements=[...], machine_type=..., keep_alive=..., exposed_port=...)`.

    Called here (a plain `python app.py`), the function just runs in this process."""

    def mark(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*a: Any, **kw: Any) -> Any:
            return fn(*a, **kw)

        call.isolated_options = dict(options)  # type: ignore[attr-defined]
        call.isolated_function = fn  # type: ignore[attr-defined]
        return call

    if len(args) == 1 and callable(args[0]) and not options:  # bare @isolated
        return mark(args[0])
    return mark
