"""The CRDs against a real apiserver: they apply, the apiserver's own CEL rules reject
bad FalFunctions and FalKeys with the CRDs' messages, and the apiserver fills in the
defaults. `fal-operator key` creates, lists and revokes FalKeys in it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import pytest

from kube import OPERATOR_BIN, REPO, Cluster, KubectlError, wait_until


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


SOURCE = {"revision": "39c4e168-414f-49f1-8160-f9f7a958e8cb", "configMap": "app-src",
          "file": "app.py", "function": "app", "requirements": ["flask"]}


def test_exactly_one_of_image_and_source(cluster: Cluster, crds, namespace):
    """A served file (`function serve`) has spec.source and no image; both or neither is
    refused by the CRD's rule."""
    both = falfunction("both", namespace, source=SOURCE)
    neither = falfunction("neither", namespace)
    del neither["spec"]["image"]
    for doc in (both, neither):
        with pytest.raises(KubectlError) as err:
            cluster.kubectl("create", "-f", "-", input=json.dumps(doc))
        assert "set exactly one of image (an app image) and source" in err.value.stderr, err.value.stderr
    served = falfunction("served", namespace, source=SOURCE)
    del served["spec"]["image"]
    cluster.kubectl("create", "-f", "-", input=json.dumps(served))
    got = cluster.json("get", "falfunction", "served", "-n", namespace)["spec"]
    assert "image" not in got and got["source"]["requirements"] == ["flask"]


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


# --- FalKey ---------------------------------------------------------------------------------

SHA = hashlib.sha256(b"s3cret").hexdigest()
FAL_KEY_LINE = re.compile(r"^FAL_KEY=([0-9a-f-]{36}):([0-9a-f]{64})$")


def falkey(name: str, namespace: str, **spec) -> dict:
    return {
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalKey",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"keyId": f"id-{name}", "secretSha256": SHA, **spec},
    }


def test_falkey_crd_is_established_and_explained(cluster: Cluster, crds):
    crd = cluster.json("get", "crd", "falkeys.fal.serverless.dev")
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds["Established"] == "True" and conds["NamesAccepted"] == "True", conds
    assert crd["spec"]["names"]["shortNames"] == ["fk"]
    out = wait_until(lambda: cluster.kubectl("explain", "falkey.spec.secretSha256").stdout, 30,
                     "kubectl explain falkey.spec.secretSha256")
    assert "never stored" in out, out


@pytest.mark.parametrize(
    "name, spec, message",
    [
        ("badsha", {"secretSha256": "not-a-hash"},
         "secretSha256 must be 64 lowercase hex characters: the SHA-256 of the key's secret "
         "(fal-operator key create makes one)"),
        ("uppersha", {"secretSha256": SHA.upper()}, "secretSha256 must be 64 lowercase hex"),
        ("colon", {"keyId": "id:x"}, "keyId must be 1 to 128 printable ASCII characters"),
        ("space", {"keyId": "id x"}, "keyId must be 1 to 128 printable ASCII characters"),
        ("fns", {"functions": ["echo", "Team/Echo"]}, "functions entries must be NAME"),
        ("rps", {"rateLimit": {"requestsPerSecond": 0}},
         "rateLimit.requestsPerSecond must be above 0 and at most 1000000"),
        ("burst", {"rateLimit": {"requestsPerSecond": 1, "burst": 0}},
         "rateLimit.burst must be at least 1"),
        ("expiry", {"expiresAt": "tomorrow"}, "date-time"),
    ],
)
def test_falkey_rules_reject_with_the_crds_message(cluster: Cluster, crds, namespace, name,
                                                   spec, message):
    with pytest.raises(KubectlError) as err:
        cluster.kubectl("create", "-f", "-", input=json.dumps(falkey(name, namespace, **spec)))
    assert message in err.value.stderr, err.value.stderr
    assert cluster.get("falkey", name, namespace) is None


def test_falkey_accepted_with_every_field_and_key_id_immutable(cluster: Cluster, crds, namespace):
    key = falkey("full", namespace, functions=["echo", "ml/sdxl"],
                 rateLimit={"requestsPerSecond": 5, "burst": 10},
                 expiresAt="2030-01-01T00:00:00Z")
    cluster.kubectl("create", "-f", "-", input=json.dumps(key))
    spec = cluster.json("get", "falkey", "full", "-n", namespace)["spec"]
    assert spec == {**key["spec"], "disabled": False}, "stored as sent, disabled defaulted"
    table = cluster.kubectl("get", "fk", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "KEYID", "FUNCTIONS", "RPS", "EXPIRES",
                                            "DISABLED", "AGE"], table
    assert "id-full" in table and "2030-01-01T00:00:00Z" in table

    with pytest.raises(KubectlError) as err:
        cluster.kubectl("patch", "falkey", "full", "-n", namespace, "--type", "merge",
                        "-p", '{"spec": {"keyId": "id-other"}}')
    assert "keyId is immutable" in err.value.stderr, err.value.stderr
    cluster.kubectl("patch", "falkey", "full", "-n", namespace, "--type", "merge",
                    "-p", '{"spec": {"disabled": true}}')
    spec = cluster.json("get", "falkey", "full", "-n", namespace)["spec"]
    assert (spec["keyId"], spec["disabled"]) == ("id-full", True)


def key_command(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    """`fal-operator key …` as the admin of the test cluster (the kubeconfig a user has)."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "NO_COLOR": "1"}
    return subprocess.run([str(OPERATOR_BIN), "key", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_key_create_apply_list_revoke(cluster: Cluster, crds, namespace, _operator_binary):
    proc = key_command(cluster, "create", "ci", "-n", namespace, "--function", "echo",
                       "--rps", "2.5", "--burst", "5", "--expires", "30d", "--apply")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.splitlines()
    key_id, secret = FAL_KEY_LINE.match(line).groups()
    assert secret not in proc.stdout
    stored = cluster.json("get", "falkey", "ci", "-n", namespace)
    assert stored["spec"]["keyId"] == key_id
    assert stored["spec"]["secretSha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert stored["spec"]["rateLimit"] == {"requestsPerSecond": 2.5, "burst": 5}
    assert secret not in json.dumps(stored), "only the hash reaches the cluster"

    again = key_command(cluster, "create", "ci", "-n", namespace, "--apply")
    assert again.returncode != 0
    assert "already exists" in again.stderr and "FAL_KEY" not in again.stderr, again.stderr

    listed = key_command(cluster, "list", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["NAMESPACE", "NAME", "KEY"]
    assert row.split()[:6] == [namespace, "ci", key_id, "echo", "2.5/s", "burst"]
    everywhere = key_command(cluster, "list", "-A")
    assert everywhere.returncode == 0 and key_id in everywhere.stdout, everywhere.stderr

    disabled = key_command(cluster, "revoke", "ci", "-n", namespace, "--disable")
    assert disabled.returncode == 0, disabled.stderr
    assert cluster.json("get", "falkey", "ci", "-n", namespace)["spec"]["disabled"] is True

    revoked = key_command(cluster, "revoke", "ci", "-n", namespace)
    assert revoked.returncode == 0, revoked.stderr
    wait_until(lambda: cluster.get("falkey", "ci", namespace) is None, 30, "the FalKey gone")
    gone = key_command(cluster, "revoke", "ci", "-n", namespace)
    assert gone.returncode != 0 and "not found" in gone.stderr, gone.stderr
    empty = key_command(cluster, "list", "-n", namespace)
    assert empty.returncode == 0 and empty.stdout == "", empty
    assert f"No FalKeys in namespace {namespace}" in empty.stderr
