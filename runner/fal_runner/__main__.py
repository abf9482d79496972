"""python -m fal_runner inspect FILE FUNCTION | build … | serve FILE FUNCTION"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("inspect", "build", "serve"):
        print("usage: python -m fal_runner inspect FILE FUNCTION | build --dest DIR … | serve FILE FUNCTION",
              file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "inspect":
        from fal_runner.inspect_source import main as run
    elif cmd == "build":
        from fal_runner.build import main as run
    else:
        from fal_runner.serve import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
