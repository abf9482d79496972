"""Builds the environment of one requirements list, once: a virtualenv made next to its
final place and renamed into it only when pip succeeded, so a half-built environment is
never used and two builds of the same hash cannot both win.

    python -m fal_runner build --dest DIR [--requirement R]… [--index-url URL]
                               [--find-links DIR]… [--no-index] [--python-version V]

pip's output goes to stdout (the build log); exit ≠ 0 with pip's error when it fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m fal_runner build")
    ap.add_argument("--dest", required=True)
    ap.add_argument("--requirement", action="append", default=[])
    ap.add_argument("--index-url")
    ap.add_argument("--find-links", action="append", default=[])
    ap.add_argument("--no-index", action="store_true")
    ap.add_argument("--python-version", help="refuse unless this python is that version")
    a = ap.parse_args(argv)
    if a.python_version:
        have = "%d.%d.%d" % sys.version_info[:3]
        if not (have == a.python_version or have.startswith(a.python_version + ".")):
            print(f"python_version={a.python_version!r}, but the runner's python is {have}: "
                  f"drop python_version, or run a runner image with Python {a.python_version}",
                  flush=True)
            return 1
    dest = os.path.abspath(a.dest)
    if os.path.isdir(dest):
        print(f"environment {dest} exists", flush=True)
        return 0
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=parent)
    try:
        print(f"$ {sys.executable} -m venv {dest}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        if a.requirement:
            pip = [os.path.join(tmp, "bin", "python"), "-m", "pip", "install",
                   "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
            if a.index_url:
                pip += ["--index-url", a.index_url]
            for f in a.find_links:
                pip += ["--find-links", f]
            if a.no_index:
                pip.append("--no-index")
            pip += ["--", *a.requirement]
            print("$ pip install " + " ".join(a.requirement), flush=True)
            r = subprocess.run(pip, stdout=sys.stdout, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                print(f"pip install failed (exit {r.returncode})", flush=True)
                return 1
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):  # not another build that won the race
                raise
        print(f"environment ready: {dest}", flush=True)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
