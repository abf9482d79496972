"""The operator configures the injected sidecar through FAL_SIDECAR_* env vars and
probes; this checks them against the real fal-sidecar binary, so the two crates cannot
drift apart silently."""

import pathlib
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sidecar_help(sidecar_bin):
    return subprocess.run([str(sidecar_bin), "serve", "--help"], capture_output=True, text=True, check=True).stdout


def rendered_sidecar(run_operator):
    out = run_operator("render", "-f", ROOT / "examples" / "seed-app.yaml")
    assert out.returncode == 0, out.stderr
    deployment = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "fal-sidecar")
    return pod, sidecar


def test_every_env_var_the_operator_sets_is_one_the_sidecar_reads(run_operator, sidecar_help):
    _, sidecar = rendered_sidecar(run_operator)
    names = [e["name"] for e in sidecar.get("env", []) if e["name"].startswith("FAL_SIDECAR_")]
    assert "FAL_SIDECAR_UPSTREAM" in names
    unknown = [n for n in names if f"[env: {n}=" not in sidecar_help]
    assert not unknown, f"the sidecar does not read {unknown}"


def test_probes_and_hooks_use_paths_the_sidecar_serves(run_operator):
    pod, sidecar = rendered_sidecar(run_operator)
    paths = {sidecar["readinessProbe"]["httpGet"]["path"], sidecar["livenessProbe"]["httpGet"]["path"]}
    app = next(c for c in pod["containers"] if c["name"] == "app")
    paths.add(app["lifecycle"]["preStop"]["httpGet"]["path"])
    assert paths <= {"/readyz", "/healthz", "/drain"}, paths
