"""Fixtures of the Helm chart tests: the real helm 3 binary ($HELM, installed by
scripts/test-chart.sh) and `helm template` of charts/fal-serverless with given values.
"""

import os
import pathlib
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fal-serverless"
RELEASE = "fal-serverless"
NAMESPACE = "fal-system"
# The oldest Kubernetes the operator supports (as tests/operator): native sidecars GA.
K8S_VERSION = "1.33.0"

# The documented install variants (README "Install with Helm", values.yaml comments).
VARIANTS = {
    "defaults": {},
    "external-store-url": {
        "redis": {"enabled": False},
        "store": {"url": "redis://:s3cret@redis.example.internal:6379/2"},
    },
    "existing-store-secret": {
        "redis": {"enabled": False},
        "store": {"existingSecret": "fal-store", "existingSecretKey": "redis-url"},
        "signing": {"existingSecret": "fal-webhook-key"},
    },
    "ingress": {
        "gateway": {
            "domain": "fal.example.com",
            "ingress": {"enabled": True, "className": "nginx", "tlsSecretName": "fal-tls",
                        "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"}},
        },
    },
    "monitoring": {
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "grafanaDashboard": {"enabled": True}},
    },
    "ha": {
        "operator": {"replicas": 2},
        "gateway": {"replicas": 3},
        "redis": {"appendfsync": "always", "persistence": {"size": "50Gi",
                                                           "storageClass": "fast"}},
        "functionNamespaces": ["default", "ml", "team-a"],
    },
    "minimal": {
        "redis": {"auth": {"enabled": False}, "persistence": {"enabled": False}},
        "gateway": {"replicas": 1, "pdb": {"enabled": False}},
        "operator": {"leaderElection": {"enabled": False}},
        "functionNamespaces": [],
    },
    "metrics-namespace": {
        "networkPolicy": {"metricsNamespace": "monitoring"},
        "monitoring": {"serviceMonitor": {"enabled": True}},
    },
    "no-network-policy": {
        "networkPolicy": {"enabled": False},
    },
    "catalog": {
        "catalog": {"machineTypes": {
            "GPU-RTX4090": {"cpu": "8", "memory": "48Gi", "gpus": 1,
                            "nodeSelector": {"gpu": "rtx4090"},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                             "effect": "NoSchedule"}]},
            "XS": {"cpu": "250m", "memory": "256Mi"},
        }},
    },
}


@pytest.fixture(scope="session")
def helm():
    path = os.environ.get("HELM")
    if not path:
        pytest.fail("HELM is not set: run these tests through scripts/test-chart.sh, "
                    "which installs helm 3 (or set HELM=/path/to/helm)")
    out = subprocess.run([path, "version", "--short"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("v3."), out.stdout + out.stderr
    return path


def run_helm(helm, *args, values=None, tmp_dir=None):
    cmd = [helm, *map(str, args)]
    if values is not None:
        vfile = pathlib.Path(tmp_dir) / "values.yaml"
        vfile.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(vfile)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def template(helm, tmp_path):
    """helm template with the given values: the list of objects, or the failed process
    when check=False."""

    def render(values=None, *extra, check=True, release=RELEASE, namespace=NAMESPACE):
        proc = run_helm(helm, "template", release, CHART, "-n", namespace,
                        "--kube-version", K8S_VERSION, *extra,
                        values=values or {}, tmp_dir=tmp_path)
        if not check:
            return proc
        assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
        return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]

    return render


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name=None):
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objs):
    return [(o, o["spec"]["template"]["spec"]) for o in objs
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def binary(env, name):
    """A workspace binary: $env, else target/debug/<name> (relative to the repo root)."""
    path = pathlib.Path(os.environ.get(env, f"target/debug/{name}"))
    if not path.is_absolute():
        path = ROOT / path
    if not path.is_file():
        pytest.fail(f"{path} not found: build it with `cargo build -p {name}` "
                    f"(or point {env} at it)")
    return path
