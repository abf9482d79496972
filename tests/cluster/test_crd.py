"""The CRD against a real apiserver: it applies, the apiserver's own CEL rules reject
bad FalFunctions with the CRD's messages, and the apiserver fills in the defaults."""

from __future__ import annotations

import json

import pytest

from kube import REPO, Cluster, KubectlError, wait_until


def falfunction(name: str, namespace: str, **spec) -> dict:
    return {
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "example/app:1", **spec},
    }


def test_crd_is_established_and_explained(cluster: Cluster, crds):
    crd = cluster.json("get", "crd", "falfunctions.fal.serverless.dev")
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds["Established"] == "True" and conds["NamesAccepted"] == "True", conds
    assert "ff" in crd["spec"]["names"]["shortNames"]
    # The field docs reach `kubectl explain` (served from the apiserver's OpenAPI).
    # The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    out = wait_until(lambda: cluster.kubectl("explain", "falfunction.spec.keepAlive").stdout, 30,
                     "kubectl explain falfunction.spec.keepAlive")
    assert "keep_alive" in out, out


def test_defaults_are_applied_by_the_apiserver(cluster: Cluster, crds, namespace):
    cluster.apply(falfunction("defaults", namespace))
    spec = cluster.json("get", "falfunction", "defaults", "-n", namespace)["spec"]
    assert spec["exposedPort"] == 8080
    assert spec["machineType"] == "XS"
    assert spec["keepAlive"] == 10
    assert spec["minReplicas"] == 0
    assert spec["maxReplicas"] == 1
    assert spec["maxConcurrency"] == 1


@pytest.mark.parametrize(
    "name, spec, message",
    [
        ("minmax", {"minReplicas": 3, "maxReplicas": 1},
         "minReplicas must be less than or equal to maxReplicas"),
        ("port9080", {"exposedPort": 9080},
         "exposedPort must not be 9080, 9081 or 9090: the fal-sidecar listens there"),
        ("port9090", {"exposedPort": 9090},
         "exposedPort must not be 9080, 9081 or 9090: the fal-sidecar listens there"),
        ("9lives", {}, "metadata.name must be a DNS-1035 label"),
        ("dotted.name", {}, "metadata.name must be a DNS-1035 label"),
    ],
)
def test_cel_rules_reject_with_the_crds_message(cluster: Cluster, crds, namespace, name, spec, message):
    with pytest.raises(KubectlError) as err:
        cluster.kubectl("create", "-f", "-", input=json.dumps(falfunction(name, namespace, **spec)))
    assert message in err.value.stderr, err.value.stderr
    assert cluster.get("falfunction", name, namespace) is None


def test_cel_rule_on_update(cluster: Cluster, crds, namespace):
    """Transition checks too: an update that breaks a rule is refused, the object kept."""
    cluster.apply(falfunction("upd", namespace, minReplicas=0, maxReplicas=2))
    with pytest.raises(KubectlError) as err:
        cluster.kubectl("patch", "falfunction", "upd", "-n", namespace, "--type", "merge",
                        "-p", '{"spec": {"minReplicas": 5}}')
    assert "minReplicas must be less than or equal to maxReplicas" in err.value.stderr
    assert cluster.json("get", "falfunction", "upd", "-n", namespace)["spec"]["minReplicas"] == 0


def test_bad_example_is_rejected(cluster: Cluster, crds):
    """examples/bad-app.yaml: out-of-range port (schema) and min > max (CEL)."""
    with pytest.raises(KubectlError) as err:
        cluster.kubectl("apply", "--dry-run=server", "-f", str(REPO / "examples" / "bad-app.yaml"))
    assert "exposedPort" in err.value.stderr and "65535" in err.value.stderr, err.value.stderr
    assert "minReplicas must be less than or equal to maxReplicas" in err.value.stderr
