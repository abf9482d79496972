"""Fixtures for the tests against a real control plane (scripts/cluster.sh): etcd,
kube-apiserver, kube-controller-manager, kube-scheduler built from the Kubernetes
Go modules, and the test kubelet running pods as local processes in their own network
namespaces.

Run:  tests/cluster/run.sh PYTHON   (builds if needed, starts the cluster, runs, stops)
or, with a cluster already up (`scripts/cluster.sh up`):  python -m pytest tests/cluster

Fixtures for later suites (the gateway, scale to zero):
  cluster                 Cluster: kubectl/json/apply, pod_address(), node_ip(), pod_log()
  crds, operator_rbac     the CRDs (FalFunction, FalKey) and the project's RBAC applied
  make_operator(*args, subcommand="controller", service_account=…)
                          a fal-operator process authenticated as a ServiceAccount
  namespace               a fresh namespace per test, deleted afterwards
  node_redis              a redis-server reachable from pods (pod_url) and the test (url)

The gateway, for example, as its own ServiceAccount in front of pods sharing Redis:
  make_operator("--store-url", node_redis.pod_url)                       # the controller
  make_operator("--store", node_redis.url, "--listen", "127.0.0.1:0", …,
                subcommand="gateway", service_account="fal-gateway")
and it reaches pods at cluster.ready_endpoints(ns, name) (their own addresses).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wallclock  # noqa: E402  (tests/wallclock.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube import CLUSTER_SH, OPERATOR_BIN, REPO, STATE, Cluster, NodeRedis, Operator, wait_until  # noqa: E402

TEST_TIMEOUT = float(os.environ.get("CLUSTER_TEST_TIMEOUT", "300"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with wallclock.limit(TEST_TIMEOUT, "CLUSTER_TEST_TIMEOUT"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure: the operator's output and the end of the kubelet's log."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or rep.when not in ("setup", "call"):
        return
    for op in item.__dict__.get("_operators", []):
        rep.sections.append((f"fal-operator ({op.log_path})", op.log()[-20000:] or "(empty)"))
    try:
        kubelet = (STATE / "logs" / "test-kubelet.log").read_text(errors="replace")
        rep.sections.append(("test-kubelet log (tail)", kubelet[-8000:]))
    except OSError:
        pass


def _up() -> bool:
    return subprocess.run([str(CLUSTER_SH), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The control plane. Started (and stopped at the end) unless already up."""
    started = False
    if not _up():
        subprocess.run([str(CLUSTER_SH), "up"], check=True, timeout=1800)
        started = True
    try:
        yield Cluster()
    finally:
        if started and not os.environ.get("FAL_CLUSTER_KEEP"):
            subprocess.run([str(CLUSTER_SH), "down"], check=False, timeout=120)


@pytest.fixture(scope="session")
def crds(cluster: Cluster):
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                    "crd/falfunctions.fal.serverless.dev", "crd/falkeys.fal.serverless.dev")
    return REPO / "crds"


def rbac_manifests() -> list[Path]:
    """The project's RBAC: deploy/rbac*.yaml, generated from the chart's templates
    (fal-system/fal-operator for the controller, fal-system/fal-gateway for the gateway)."""
    first = REPO / "deploy" / "rbac.yaml"  # it holds the fal-system Namespace
    return [first, *sorted(p for p in (REPO / "deploy").glob("rbac*.yaml") if p != first)]


@pytest.fixture(scope="session")
def operator_rbac(cluster: Cluster, crds):
    for path in rbac_manifests():
        cluster.kubectl("apply", "-f", str(path))
    # The token for the ServiceAccount comes from the TokenRequest API.
    wait_until(lambda: cluster.get("serviceaccount", "fal-operator", "fal-system"), 30,
               "ServiceAccount fal-system/fal-operator")
    return ("fal-system", "fal-operator")


def operator_supports(flag: str, subcommand: str = "controller") -> bool:
    out = subprocess.run([str(OPERATOR_BIN), subcommand, "--help"], capture_output=True, text=True)
    return flag in out.stdout


@pytest.fixture(scope="session")
def _operator_binary():
    if not OPERATOR_BIN.is_file():
        pytest.exit(f"fal-operator binary not found at {OPERATOR_BIN}: build it (cargo build) "
                    "or set FAL_OPERATOR_BIN", returncode=3)


@pytest.fixture
def make_operator(request, cluster: Cluster, operator_rbac, tmp_path, _operator_binary):
    """Factory: make_operator("--store-url", "…") starts `fal-operator controller` as
    the fal-system/fal-operator ServiceAccount; stopped at teardown."""
    made: list[Operator] = []
    request.node.__dict__["_operators"] = made

    def factory(*args: str, **kw) -> Operator:
        workdir = tmp_path / f"operator{len(made)}"
        workdir.mkdir()
        op = Operator(cluster, workdir, *args, **kw)
        made.append(op)
        return op.start()

    yield factory
    for op in made:
        op.stop()


@pytest.fixture
def namespace(cluster: Cluster):
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    wait_until(lambda: cluster.get("serviceaccount", "default", name), 30,
               f"the default ServiceAccount of {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def node_redis(cluster: Cluster, tmp_path):
    """The shared store as in a cluster: pods reach it at the node's address."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (scripts/test.sh installs it)")
    redis = NodeRedis(tmp_path, cluster.node_ip()).start()
    yield redis
    redis.stop()
