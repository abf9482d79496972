"""Fixtures for the operator's offline validation tests.

The binary under test comes from FAL_OPERATOR_BIN (default target/debug/fal-operator,
relative to the repository root); scripts/test-operator.sh runs these tests after
`cargo build`.
"""

import os
import pathlib
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def binary(env: str, name: str) -> pathlib.Path:
    """A workspace binary: $env, else target/debug/<name> (relative to the repo root)."""
    path = pathlib.Path(os.environ.get(env, f"target/debug/{name}"))
    if not path.is_absolute():
        path = ROOT / path
    if not path.is_file():
        pytest.fail(f"{path} not found: build it with `cargo build -p {name}`")
    return path


@pytest.fixture(scope="session")
def operator_bin():
    return binary("FAL_OPERATOR_BIN", "fal-operator")


@pytest.fixture(scope="session")
def sidecar_bin():
    return binary("FAL_SIDECAR_BIN", "fal-sidecar")


@pytest.fixture(scope="session")
def run_operator(operator_bin):
    def run(*args, input_text=None):
        return subprocess.run(
            [str(operator_bin), *map(str, args)],
            cwd=ROOT,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@pytest.fixture(scope="session")
def render(run_operator):
    """Renders a manifest file; returns the list of objects. Fails on a non-zero exit."""

    def render_file(path, *extra):
        proc = run_operator("render", "-f", path, *extra)
        assert proc.returncode == 0, f"render failed: {proc.stderr}"
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
        assert docs, "render printed nothing"
        return docs

    return render_file


@pytest.fixture(scope="session")
def crd():
    with open(ROOT / "crds" / "falfunctions.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="session")
def falkey_crd():
    with open(ROOT / "crds" / "falkeys.yaml") as f:
        return yaml.safe_load(f)
