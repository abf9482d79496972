"""`python -m fal_runner build`: what the cluster's build Job and `fal-operator local`
run. A python_version the interpreter does not have is refused before anything is
built; an environment that exists is not built again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "runner"


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fal_runner", "build", *args], cwd=RUNNER,
                          capture_output=True, text=True, timeout=120)


def test_a_python_version_it_is_not_is_refused(tmp_path):
    dest = tmp_path / "env"
    proc = build("--dest", str(dest), "--python-version", "2.7")
    assert proc.returncode == 1
    have = "%d.%d.%d" % sys.version_info[:3]
    assert "python_version='2.7'" in proc.stdout and have in proc.stdout, proc.stdout
    assert not dest.exists() and list(tmp_path.iterdir()) == [], "nothing half-built"


def test_its_own_version_builds_and_an_existing_environment_is_kept(tmp_path):
    dest = tmp_path / "env"
    minor = "%d.%d" % sys.version_info[:2]
    proc = build("--dest", str(dest), "--python-version", minor)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (dest / "bin" / "python").exists()
    again = build("--dest", str(dest))
    assert again.returncode == 0 and "exists" in again.stdout, again.stdout
