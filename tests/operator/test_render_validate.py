"""Every object `fal-operator render` produces is a valid Kubernetes object (strict
schema of a pinned Kubernetes version, offline), and the examples are valid against
the CRD's own OpenAPI schema."""

import copy
import pathlib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT

# The oldest Kubernetes the operator supports (k8s-openapi feature v1_33): native
# sidecars are GA there. Strict mode rejects unknown fields.
K8S_VERSION = "1.33.0"

MACHINE_TYPES = [
    "XS", "S", "M", "L",
    "GPU-T4", "GPU-A10G", "GPU-L4", "GPU-A100", "GPU-A100-80G", "GPU-H100",
]
GOOD_EXAMPLES = ["examples/seed-app.yaml", "examples/cpu-app.yaml"]
BAD_EXAMPLE = "examples/bad-app.yaml"


def k8s_validate(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def load(path):
    with open(ROOT / path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def pods(objs):
    return [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"]


def test_validator_is_strict_and_catches_errors():
    # Guard against a validator that accepts anything: these must fail.
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                      "spec": {"ports": [{"port": "eighty"}]}})
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                      "spec": {"portz": []}})


@pytest.mark.parametrize("example", GOOD_EXAMPLES)
def test_examples_render_to_valid_objects(render, example):
    objs = render(example)
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "NetworkPolicy"]
    for obj in objs:
        k8s_validate(obj)
    (pod,) = pods(objs)
    sidecar = pod["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert "replicas" not in objs[0]["spec"], "replicas belong to the autoscaler"


@pytest.mark.parametrize("machine_type", MACHINE_TYPES)
def test_every_machine_type_renders_valid_objects(render, tmp_path, machine_type):
    (ff,) = load("examples/seed-app.yaml")
    ff["spec"]["machineType"] = machine_type
    manifest = tmp_path / "ff.yaml"
    manifest.write_text(yaml.safe_dump(ff))
    objs = render(manifest)
    for obj in objs:
        k8s_validate(obj)
    (pod,) = pods(objs)
    limits = pod["containers"][0]["resources"]["limits"]
    if machine_type.startswith("GPU-"):
        assert limits["nvidia.com/gpu"] == "1"
        terms = pod["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        keys = {e["key"] for t in terms for e in t["matchExpressions"]}
        assert {"karpenter.k8s.aws/instance-gpu-name", "nvidia.com/gpu.product"} <= keys
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in limits
        assert "affinity" not in pod and "tolerations" not in pod


def test_every_optional_field_renders_valid_objects(render, tmp_path):
    (ff,) = load("examples/seed-app.yaml")
    ff["spec"].update({
        "machineType": "GPU-H100",
        "numGpus": 8,
        "command": ["python"],
        "args": ["/app/flask_app.py"],
        "env": [
            {"name": "MODEL", "value": "sdxl"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "envFrom": [{"secretRef": {"name": "hf-token"}}, {"configMapRef": {"name": "cfg"}}],
        "resources": {"limits": {"memory": "300Gi"}, "requests": {"cpu": "32",
                                                                  "ephemeral-storage": "100Gi"}},
        "nodeSelector": {"pool": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "dedicated", "operator": "Equal", "value": "ml",
                         "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": {"x": "y"}}}}]}},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccountName": "runner",
        "readinessPath": "/health",
        "requestTimeout": 900,
        "startupTimeout": 1800,
    })
    manifest = tmp_path / "ff.yaml"
    manifest.write_text(yaml.safe_dump(ff))
    objs = render(manifest)
    for obj in objs:
        k8s_validate(obj)
    (pod,) = pods(objs)
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["serviceAccountName"] == "runner"
    assert pod["terminationGracePeriodSeconds"] == 930


def test_custom_catalog_renders_valid_objects(render, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"machineTypes": {"GPU-RTX4090": {
        "cpu": "8", "memory": "48Gi", "gpus": 2,
        "nodeSelector": {"gpu": "rtx4090"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                         "effect": "NoSchedule"}],
    }}}))
    (ff,) = load("examples/seed-app.yaml")
    ff["spec"]["machineType"] = "GPU-RTX4090"
    manifest = tmp_path / "ff.yaml"
    manifest.write_text(yaml.safe_dump(ff))
    objs = render(manifest, "--catalog", catalog)
    for obj in objs:
        k8s_validate(obj)
    (pod,) = pods(objs)
    assert pod["nodeSelector"] == {"gpu": "rtx4090"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


# What `fal-operator function serve` applies for a decorated file (its revision's source
# is in the ConfigMap it names).
SERVED = {
    "apiVersion": "fal.serverless.dev/v1alpha1",
    "kind": "FalFunction",
    "metadata": {"name": "app", "namespace": "team-a",
                 "annotations": {"fal.serverless.dev/fingerprint": "0" * 64}},
    "spec": {
        "machineType": "GPU-T4", "keepAlive": 300, "exposedPort": 8080, "auth": "public",
        "source": {"revision": "39c4e168-414f-49f1-8160-f9f7a958e8cb",
                   "configMap": "app-39c4e168-414f-49f1-8160-f9f7a958e8cb",
                   "file": "app.py", "function": "app", "requirements": ["flask"],
                   "findLinks": ["https://mirror.internal/wheels/"], "noIndex": True},
    },
}


def test_a_served_file_renders_valid_objects(render, tmp_path, crd):
    """The environments claim, the build Job and the runner's Deployment of a served file
    are valid objects; the FalFunction matches the CRD schema."""
    jsonschema.validate(SERVED, crd_schema(crd))
    manifest = tmp_path / "served.yaml"
    manifest.write_text(yaml.safe_dump(SERVED))
    objs = render(manifest, "--environments-access-mode", "ReadWriteOnce",
                  "--build-env", "PIP_TRUSTED_HOST=mirror.internal")
    assert [o["kind"] for o in objs] == [
        "PersistentVolumeClaim", "Job", "Deployment", "Service", "NetworkPolicy"]
    for obj in objs:
        k8s_validate(obj)
    claim, job, deployment = objs[:3]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    build = job["spec"]["template"]["spec"]["containers"][0]
    assert build["command"][:4] == ["python3", "-m", "fal_runner", "build"]
    assert {"name": "PIP_TRUSTED_HOST", "value": "mirror.internal"} in build["env"]
    env_dir = build["command"][5]
    (app,) = deployment["spec"]["template"]["spec"]["containers"]
    assert app["command"][0] == f"{env_dir}/bin/python", "the pods run what the Job built"
    assert app["image"] == build["image"] == "ghcr.io/fal-serverless-k8s/fal-runner:0.1.0"


def test_crds_are_valid_and_up_to_date(run_operator, crd, falkey_crd):
    proc = run_operator("crd")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    assert docs == [crd, falkey_crd], \
        "crds/*.yaml are stale: cargo run -p fal-operator -- crd --dir crds"
    for doc in docs:
        k8s_validate(doc)


def test_rbac_manifest_is_valid():
    objs = load("deploy/rbac.yaml")
    assert {o["kind"] for o in objs} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for obj in objs:
        k8s_validate(obj)
    (role,) = [o for o in objs if o["kind"] == "ClusterRole"]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if "delete" in rule["verbs"]:
            # The NetworkPolicies removed with --network-policy=false, and the sources and
            # build Jobs of revisions past a served file's history; owner references
            # garbage-collect everything else.
            assert set(rule["resources"]) <= {"networkpolicies", "configmaps", "jobs"}, rule


def _closed(schema):
    """The CRD schema with unknown fields forbidden (the apiserver would prune them
    silently; in an example they are a typo)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    # The root stays open: apiVersion, kind and metadata are implicit in a CRD schema.
    for prop in schema["properties"].values():
        walk(prop)
    return schema


def crd_schema(crd):
    (version,) = crd["spec"]["versions"]
    return _closed(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("example", GOOD_EXAMPLES)
def test_examples_match_the_crd_schema(crd, example):
    for doc in load(example):
        assert doc["apiVersion"] == f'{crd["spec"]["group"]}/v1alpha1'
        assert doc["kind"] == crd["spec"]["names"]["kind"]
        jsonschema.validate(doc, crd_schema(crd), cls=jsonschema.Draft4Validator)


def test_bad_example_fails_the_crd_schema(crd):
    (doc,) = load(BAD_EXAMPLE)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(doc, crd_schema(crd), cls=jsonschema.Draft4Validator)
    assert list(err.value.absolute_path) == ["spec", "exposedPort"]


@pytest.mark.parametrize("field,value", [
    ("exposedPort", 0), ("exposedPort", "8080"), ("minReplicas", -1), ("maxReplicas", 0),
    ("maxConcurrency", 0), ("keepAlive", -1), ("image", ""), ("readinessPath", "health"),
    ("numGpus", 0), ("unknownField", 1),
])
def test_crd_schema_rejects_bad_values(crd, field, value):
    (doc,) = load("examples/seed-app.yaml")
    doc["spec"][field] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema(crd), cls=jsonschema.Draft4Validator)


def test_crd_carries_the_cel_rules(crd):
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "self.minReplicas <= self.maxReplicas" in rules
    port_rules = [r["rule"] for r in spec["properties"]["exposedPort"]["x-kubernetes-validations"]]
    assert port_rules == ["self != 9080 && self != 9081 && self != 9090"]


def test_bad_example_fails_render_naming_the_field(run_operator):
    proc = run_operator("render", "-f", BAD_EXAMPLE)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "spec.exposedPort" in proc.stderr, proc.stderr


def test_unknown_machine_type_fails_render(run_operator, tmp_path):
    (ff,) = load("examples/cpu-app.yaml")
    ff["spec"]["machineType"] = "GPU-B200"
    manifest = tmp_path / "ff.yaml"
    manifest.write_text(yaml.safe_dump(ff))
    proc = run_operator("render", "-f", manifest)
    assert proc.returncode != 0
    assert "spec.machineType" in proc.stderr and "GPU-B200" in proc.stderr, proc.stderr


def test_render_reads_stdin(run_operator):
    text = (ROOT / "examples/cpu-app.yaml").read_text()
    proc = run_operator("render", "-f", "-", input_text=text)
    assert proc.returncode == 0, proc.stderr
    assert [d["kind"] for d in yaml.safe_load_all(proc.stdout)] == \
        ["Deployment", "Service", "NetworkPolicy"]


def test_network_policy_admits_the_gateway_and_the_metrics_namespace(render):
    objs = render("examples/cpu-app.yaml", "--gateway-namespace", "fal-gw",
                  "--gateway-pod-labels", "app.kubernetes.io/component=gateway,tier=edge",
                  "--metrics-namespace", "monitoring")
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    k8s_validate(policy)
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["metadata"]["labels"] == dep["metadata"]["labels"]
    gateway, metrics = spec["ingress"]
    assert gateway == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fal-gw"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway",
                                                  "tier": "edge"}}}],
        "ports": [{"port": 9080, "protocol": "TCP"}],
    }
    assert metrics == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": 9090, "protocol": "TCP"}],
    }
    sidecar = dep["spec"]["template"]["spec"]["initContainers"][0]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert (ports["http"], ports["metrics"]) == (9080, 9090), "the policy opens the sidecar's ports"


def test_network_policy_off_renders_none(render):
    objs = render("examples/cpu-app.yaml", "--network-policy=false")
    assert [o["kind"] for o in objs] == ["Deployment", "Service"]
