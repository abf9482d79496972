"""charts/fal-serverless rendered by the real helm: lint, every documented variant valid
against the Kubernetes schema (strict, offline), restricted containers, the store URL
only through Secrets, and the chart in step with the crates (version, CRD, images,
flags, catalog format)."""

import base64
import json
import pathlib
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import (CHART, K8S_VERSION, NAMESPACE, RELEASE, ROOT, VARIANTS, binary, by_kind,
                      env_of, one, pod_specs, run_helm)

HERE = pathlib.Path(__file__).resolve().parent
# kubernetes-validate knows only built-in kinds; the ServiceMonitor is checked against
# the subset of the prometheus-operator CRD schema the chart uses (unknown fields fail).
SERVICE_MONITOR_SCHEMA = json.loads((HERE / "servicemonitor.schema.json").read_text())


def validate(obj):
    if obj["apiVersion"] == "monitoring.coreos.com/v1":
        jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def cargo_version(crate):
    text = (ROOT / crate / "Cargo.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def chart_meta():
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def chart_values():
    return yaml.safe_load((CHART / "values.yaml").read_text())


# --- lint and schema ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(helm, tmp_path, variant):
    proc = run_helm(helm, "lint", "--strict", CHART, "--kube-version", K8S_VERSION,
                    values=VARIANTS[variant], tmp_dir=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_is_valid(template, variant):
    objs = template(VARIANTS[variant])
    assert objs
    for obj in objs:
        try:
            validate(obj)
        except Exception as e:  # noqa: BLE001 - name the object in the failure
            pytest.fail(f"{variant}: {obj['kind']} {obj['metadata'].get('name')}: {e}")
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "two objects with the same kind/namespace/name"


def test_validators_catch_errors():
    # Guard against validators that accept anything.
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "apps/v1", "kind": "Deployment",
                                      "metadata": {"name": "x"}, "spec": {"replicas": "2"}},
                                     K8S_VERSION, strict=True)
    with pytest.raises(jsonschema.ValidationError):
        validate({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                  "metadata": {"name": "x"},
                  "spec": {"selector": {}, "endpoints": [{"prot": "metrics"}]}})


def test_values_file_matches_its_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(chart_values(), schema, cls=jsonschema.Draft7Validator)
    for values in VARIANTS.values():
        # Variants are overlays; each of their keys must be known to the schema.
        jsonschema.validate(values, schema, cls=jsonschema.Draft7Validator)


# --- bad values: refused, with a message naming the key -----------------------------------

BAD_VALUES = [
    # (values, every fragment the error must contain)
    ({"gateway": {"replicas": "two"}}, ["gateway.replicas", "integer"]),
    ({"gateway": {"replicas": 0}}, ["gateway.replicas"]),
    ({"gateway": {"replcas": 2}}, ["gateway", "replcas"]),
    ({"operator": {"replicas": -1}}, ["operator.replicas"]),
    ({"redis": {"appendfsync": "sometimes"}}, ["redis.appendfsync"]),
    ({"redis": {"enabled": "yes"}}, ["redis.enabled", "boolean"]),
    ({"redis": {"enabled": False}, "store": {"url": "http://redis:6379"}}, ["store.url"]),
    ({"gateway": {"ingress": {"enabled": True, "host": "Not A Host"}}}, ["gateway.ingress.host"]),
    ({"gateway": {"resources": {"requests": None}}}, ["gateway.resources", "requests"]),
    ({"operator": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}},
     ["operator.resources.requests.cpu"]),
    ({"catalog": {"machineTypes": {"GPU-X": {"cpu": "4", "gpus": 1}}}},
     ["catalog.machineTypes.GPU-X", "memory"]),
    ({"catalog": {"machineTypes": {"GPU-X": {"cpu": "4", "memory": "8Gi", "gpu": 1}}}},
     ["catalog.machineTypes.GPU-X", "gpu"]),
    ({"monitoring": {"serviceMonitor": {"interval": "often"}}},
     ["monitoring.serviceMonitor.interval"]),
    ({"functionNamespaces": ["Default"]}, ["functionNamespaces"]),
    ({"gateway": {"domain": "https://fal.example.com"}}, ["gateway.domain"]),
    ({"gateway": {"scheme": "ftp"}}, ["gateway.scheme"]),
    ({"networkPolicy": {"metricsNamespace": "Monitoring"}}, ["networkPolicy.metricsNamespace"]),
    ({"networkPolicy": {"enabled": "yes"}}, ["networkPolicy.enabled", "boolean"]),
    # Checks the schema cannot express: refused by the templates, naming the setting.
    ({"redis": {"enabled": False}}, ["store", "store.url", "store.existingSecret"]),
    ({"store": {"url": "redis://ext:6379/0"}}, ["store", "redis.enabled=false"]),
    ({"redis": {"enabled": False}, "store": {"url": "redis://a:6379/0", "existingSecret": "s"}},
     ["store", "choose one"]),
    ({"gateway": {"ingress": {"enabled": True}}}, ["gateway.ingress.host", "gateway.domain"]),
    ({"catalog": {"replaceDefaults": True}}, ["catalog.machineTypes", "catalog.replaceDefaults"]),
    ({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}},
     ["operator.replicas", "operator.leaderElection.enabled"]),
    ({"store": {"replicas": 1}}, ["store.replicas", "bundled Redis"]),
    ({"redis": {"enabled": False}, "store": {"url": "redis+cluster://a:1", "replicas": -1}},
     ["store.replicas"]),
    ({"redis": {"enabled": False}, "store": {"url": "redis+memcache://a:1"}}, ["store.url"]),
]


def key_forms(fragment):
    """helm 3.17 names keys as a.b.c; later versions as /a/b/c."""
    return [fragment, "/" + fragment.replace(".", "/")]


@pytest.mark.parametrize("values,fragments", BAD_VALUES,
                         ids=[json.dumps(v, separators=(",", ":")) for v, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(template, values, fragments):
    proc = template(values, check=False)
    assert proc.returncode != 0, f"accepted: {values}"
    for fragment in fragments:
        assert any(f in proc.stderr for f in key_forms(fragment)), \
            f"{fragment!r} not in the error:\n{proc.stderr}"


def render_notes(helm, tmp_path, values):
    """NOTES.txt as `helm install` prints it. helm renders NOTES only when installing,
    and even --dry-run=client needs a cluster; so a copy of the chart renders it through
    `tpl` into a ConfigMap, with the same values and helpers."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    proc = run_helm(helm, "template", RELEASE, chart, "-n", NAMESPACE,
                    "--kube-version", K8S_VERSION, "--show-only", "templates/zz-notes.yaml",
                    values=values, tmp_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_notes_show_how_to_call_a_function(helm, tmp_path):
    notes = render_notes(helm, tmp_path, {})
    assert "port-forward svc/fal-serverless-gateway" in notes
    assert 'curl -H "Authorization: Key $FAL_KEY" -X POST $RUN/default/seed-app/test' in notes
    assert "fal-operator key create" in notes
    assert "fal_client.submit" in notes and "QUEUE_URL_FORMAT" in notes
    assert "kubectl apply --server-side -f charts/fal-serverless/crds/" in notes


def test_notes_warn_when_the_network_policy_closes_metrics(helm, tmp_path):
    warning = "set networkPolicy.metricsNamespace"
    for variant, warned in [("monitoring", True), ("metrics-namespace", False), ("defaults", False)]:
        work = tmp_path / variant
        work.mkdir()
        assert (warning in render_notes(helm, work, VARIANTS[variant])) == warned, variant


def test_ingress_notes_use_the_hosts(helm, tmp_path):
    notes = render_notes(helm, tmp_path, VARIANTS["ingress"])
    assert "RUN=https://fal.example.com" in notes
    assert "QUEUE=https://queue.fal.example.com" in notes
    assert "FAL_RUN_HOST=fal.example.com" in notes


# --- security --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_container_is_restricted(template, variant):
    objs = template(VARIANTS[variant])
    workloads = pod_specs(objs)
    assert workloads
    for obj, pod in workloads:
        where = f"{variant}: {obj['kind']} {obj['metadata']['name']}"
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("runAsUser", 0) != 0, where
        assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
            assert sc.get("capabilities") == {"drop": ["ALL"]}, f"{where}/{c['name']}"
            assert sc.get("runAsNonRoot") is True, f"{where}/{c['name']}"
            assert sc.get("privileged") in (None, False), f"{where}/{c['name']}"
            assert sc.get("seccompProfile", psc["seccompProfile"]) == {"type": "RuntimeDefault"}
            req = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(req), f"{where}/{c['name']}: no resource requests"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_store_url_never_a_plaintext_env_value(template, variant):
    objs = template(VARIANTS[variant])
    for obj, pod in pod_specs(objs):
        for c in pod["containers"] + pod.get("initContainers", []):
            for e in c.get("env", []):
                assert "redis://" not in e.get("value", ""), f"{obj['metadata']['name']}: {e}"
            env = env_of(c)
            if "FAL_STORE_URL" in env:
                ref = env["FAL_STORE_URL"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"]


def test_store_from_the_bundled_redis(template):
    objs = template()
    secrets = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == "fal-serverless-store"]
    # The release namespace plus each function namespace, with the same URL.
    assert {s["metadata"]["namespace"] for s in secrets} == {NAMESPACE, "default"}
    urls = {base64.b64decode(s["data"]["url"]).decode() for s in secrets}
    (url,) = urls
    password = base64.b64decode(secrets[0]["data"]["password"]).decode()
    assert len(password) >= 32
    assert url == f"redis://:{password}@fal-serverless-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    sts = one(objs, "StatefulSet", "fal-serverless-redis")
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert redis["command"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert env_of(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "fal-serverless-store", "key": "password"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    conf = one(objs, "ConfigMap", "fal-serverless-redis")["data"]["redis.conf"]
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    svc = one(objs, "Service", "fal-serverless-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379


def test_redis_network_policy_admits_exactly_the_store_clients(template, tmp_path):
    objs = template()
    policy = one(objs, "NetworkPolicy")
    sts = one(objs, "StatefulSet")
    assert policy["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                  for d in by_kind(objs, "Deployment")}

    def admitted(labels, other_namespace=False):
        for peer in rule["from"]:
            if other_namespace and "namespaceSelector" not in peer:
                continue
            if peer["podSelector"]["matchLabels"].items() <= labels.items():
                return True
        return False

    assert admitted(pod_labels["fal-serverless-operator"])
    assert admitted(pod_labels["fal-serverless-gateway"])
    # Function pods, as the operator renders them, from their own namespace.
    operator = binary("FAL_OPERATOR_BIN", "fal-operator")
    out = subprocess.run([str(operator), "render", "-f", ROOT / "examples" / "seed-app.yaml"],
                         capture_output=True, text=True, check=True)
    dep = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    assert admitted(dep["spec"]["template"]["metadata"]["labels"], other_namespace=True)
    assert not admitted({"app": "something-else"}, other_namespace=True)
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    assert not by_kind(template({"redis": {"networkPolicy": {"enabled": False}}}), "NetworkPolicy")


def test_bundled_redis_password_is_random_per_install(template):
    def password():
        (s,) = [s for s in by_kind(template(), "Secret")
                if s["metadata"]["name"] == "fal-serverless-store"
                and s["metadata"]["namespace"] == NAMESPACE]
        return s["data"]["password"]

    assert password() != password()


def test_store_from_an_external_url(template):
    objs = template(VARIANTS["external-store-url"])
    assert not by_kind(objs, "StatefulSet"), "no bundled Redis with redis.enabled=false"
    secret = one([s for s in by_kind(objs, "Secret") if s["metadata"]["namespace"] == NAMESPACE],
                 "Secret", "fal-serverless-store")
    assert base64.b64decode(secret["data"]["url"]).decode() == \
        "redis://:s3cret@redis.example.internal:6379/2"
    assert "password" not in secret["data"]
    for name in ("fal-serverless-operator", "fal-serverless-gateway"):
        c = one(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert env_of(c)["FAL_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "fal-serverless-store", "key": "url"}


def test_store_cluster_url_and_replicas_reach_gateway_and_operator(template):
    objs = template({"redis": {"enabled": False},
                     "store": {"url": "redis+cluster://:pw@r1:7000,r2:7000", "replicas": 1}})
    for name in ("fal-serverless-operator", "fal-serverless-gateway"):
        env = env_of(one(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0])
        assert env["FAL_STORE_REPLICAS"]["value"] == "1"
        assert "secretKeyRef" in env["FAL_STORE_URL"]["valueFrom"]
    objs = template(VARIANTS["external-store-url"])
    env = env_of(one(objs, "Deployment", "fal-serverless-gateway")["spec"]["template"]["spec"]["containers"][0])
    assert "FAL_STORE_REPLICAS" not in env


def test_store_from_an_existing_secret(template):
    objs = template(VARIANTS["existing-store-secret"])
    assert not by_kind(objs, "StatefulSet")
    assert not by_kind(objs, "Secret"), "the chart writes no Secret when both are given"
    operator = one(objs, "Deployment", "fal-serverless-operator")["spec"]["template"]["spec"]
    gateway = one(objs, "Deployment", "fal-serverless-gateway")["spec"]["template"]["spec"]
    for pod in (operator, gateway):
        env = env_of(pod["containers"][0])
        assert env["FAL_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "fal-store", "key": "redis-url"}
    env = env_of(operator["containers"][0])
    assert env["FAL_STORE_SECRET"]["value"] == "fal-store:redis-url"
    assert env["FAL_SIGNING_KEY_SECRET"]["value"] == "fal-webhook-key"
    (vol,) = [v for v in gateway["volumes"] if v["name"] == "signing-key"]
    assert vol["secret"]["secretName"] == "fal-webhook-key"


# --- signing key --------------------------------------------------------------------------------


def signing_secrets(objs):
    return [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == "fal-serverless-signing-key"]


def test_signing_key_is_one_ed25519_seed_in_every_namespace(template):
    objs = template(VARIANTS["ha"])
    secrets = signing_secrets(objs)
    assert {s["metadata"]["namespace"] for s in secrets} == {NAMESPACE, "default", "ml", "team-a"}
    (data,) = {s["data"]["signing-key"] for s in secrets}
    # The file the sidecar and gateway read: base64 of 32 bytes (a format parse_seed takes).
    assert len(base64.b64decode(base64.b64decode(data), validate=True)) == 32
    for s in secrets:
        assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    operator = one(objs, "Deployment", "fal-serverless-operator")
    env = env_of(operator["spec"]["template"]["spec"]["containers"][0])
    assert env["FAL_SIGNING_KEY_SECRET"]["value"] == "fal-serverless-signing-key"


def test_signed_by_the_sidecar_with_the_chart_key(template, tmp_path):
    """The key file the chart mounts is one the real fal-sidecar accepts: it serves the
    JWKS of that key (checked by starting the sidecar with --signing-key)."""
    import socket
    import time
    import urllib.request

    (secret,) = [s for s in signing_secrets(template()) if s["metadata"]["namespace"] == NAMESPACE]
    key_file = tmp_path / "signing-key"
    key_file.write_bytes(base64.b64decode(secret["data"]["signing-key"]))
    ports = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s)
    listen, queue, admin = (s.getsockname()[1] for s in ports)
    for s in ports:
        s.close()
    sidecar = binary("FAL_SIDECAR_BIN", "fal-sidecar")
    proc = subprocess.Popen(
        [str(sidecar), "serve", "--upstream", "http://127.0.0.1:9",
         "--listen", f"127.0.0.1:{listen}", "--queue-listen", f"127.0.0.1:{queue}",
         "--admin-listen", f"127.0.0.1:{admin}", "--data-dir", str(tmp_path / "data"),
         "--signing-key", str(key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        jwks = None
        for _ in range(200):
            if proc.poll() is not None:
                pytest.fail(f"fal-sidecar exited: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{queue}/.well-known/jwks.json",
                                            timeout=2) as r:
                    jwks = json.load(r)
                break
            except OSError:
                time.sleep(0.05)
        assert jwks is not None, "the sidecar never served its JWKS"
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        seed = base64.b64decode(key_file.read_text())
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(public).rstrip(b"=").decode()
        assert [k["x"] for k in jwks["keys"]] == [x]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- components ------------------------------------------------------------------------------


def test_operator_deployment(template):
    objs = template()
    dep = one(objs, "Deployment", "fal-serverless-operator")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/fal-serverless-k8s/fal-operator:0.1.0"
    assert c["args"] == ["controller"]
    env = env_of(c)
    assert env["FAL_SIDECAR_IMAGE"]["value"] == "ghcr.io/fal-serverless-k8s/fal-sidecar:0.1.0"
    assert env["FAL_LEADER_ELECT"]["value"] == "true"
    assert env["FAL_LEASE_NAME"]["value"] == "fal-serverless-operator"
    assert env["FAL_LEASE_NAMESPACE"]["value"] == NAMESPACE
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["serviceAccountName"] == "fal-serverless-operator"
    # The catalog file the operator reads is the ConfigMap's key.
    mount = next(m for m in c["volumeMounts"] if m["name"] == "catalog")
    assert env["FAL_CATALOG"]["value"] == mount["mountPath"] + "/catalog.yaml"
    assert next(v for v in pod["volumes"] if v["name"] == "catalog")["configMap"]["name"] == \
        "fal-serverless-catalog"
    probe_port = c["readinessProbe"]["httpGet"]["port"]
    assert probe_port in [p["name"] for p in c["ports"]]
    assert env["FAL_NETWORK_POLICY"]["value"] == "true"
    assert env["FAL_GATEWAY_NAMESPACE"]["value"] == NAMESPACE
    assert "FAL_METRICS_NAMESPACE" not in env


@pytest.mark.parametrize("release,values,prefix", [
    (RELEASE, {}, "fal-serverless"),
    ("prod", {"nameOverride": "fal"}, "prod-fal"),
])
def test_operator_network_policy_settings_select_the_gateway_pods(template, release, values, prefix):
    """FAL_GATEWAY_POD_LABELS is exactly the gateway Deployment's selector: every gateway
    pod of this release matches it, no other pod of the chart does."""
    objs = template(values, release=release)
    operator = one(objs, "Deployment", f"{prefix}-operator")
    gateway = one(objs, "Deployment", f"{prefix}-gateway")
    env = env_of(operator["spec"]["template"]["spec"]["containers"][0])
    labels = dict(kv.split("=", 1) for kv in env["FAL_GATEWAY_POD_LABELS"]["value"].split(","))
    assert labels == gateway["spec"]["selector"]["matchLabels"]
    assert labels["app.kubernetes.io/instance"] == release
    for obj, _ in pod_specs(objs):
        matches = labels.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        assert matches == (obj is gateway), obj["metadata"]["name"]


def test_network_policy_values_reach_the_operator(template):
    env = env_of(one(template(VARIANTS["metrics-namespace"]), "Deployment",
                     "fal-serverless-operator")["spec"]["template"]["spec"]["containers"][0])
    assert env["FAL_METRICS_NAMESPACE"]["value"] == "monitoring"
    env = env_of(one(template(VARIANTS["no-network-policy"]), "Deployment",
                     "fal-serverless-operator")["spec"]["template"]["spec"]["containers"][0])
    assert env["FAL_NETWORK_POLICY"]["value"] == "false"
    assert not {"FAL_GATEWAY_NAMESPACE", "FAL_GATEWAY_POD_LABELS", "FAL_METRICS_NAMESPACE"} & env.keys()


def test_ha_variant(template):
    objs = template(VARIANTS["ha"])
    assert one(objs, "Deployment", "fal-serverless-operator")["spec"]["replicas"] == 2
    gateway = one(objs, "Deployment", "fal-serverless-gateway")
    assert gateway["spec"]["replicas"] == 3
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    role = one(objs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": ["fal-serverless-operator"], "verbs": ["get", "update"]}]
    sts = one(objs, "StatefulSet")
    assert "appendfsync always" in one(objs, "ConfigMap", "fal-serverless-redis")["data"]["redis.conf"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"


def test_minimal_variant(template):
    objs = template(VARIANTS["minimal"])
    assert not by_kind(objs, "PodDisruptionBudget")
    assert not by_kind(objs, "Role"), "no Lease permissions without leader election"
    env = env_of(one(objs, "Deployment", "fal-serverless-operator")["spec"]["template"]["spec"]["containers"][0])
    assert env["FAL_LEADER_ELECT"]["value"] == "false"
    sts = one(objs, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" not in redis["command"]
    url = base64.b64decode(one(objs, "Secret", "fal-serverless-store")["data"]["url"]).decode()
    assert url == f"redis://fal-serverless-redis.{NAMESPACE}.svc.cluster.local:6379/0"


def test_gateway(template):
    objs = template()
    dep = one(objs, "Deployment", "fal-serverless-gateway")
    assert dep["spec"]["replicas"] == 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/fal-serverless-k8s/fal-operator:0.1.0"
    assert c["args"] == ["gateway"]
    env = env_of(c)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "signing-key")
    assert env["FAL_SIGNING_KEY_FILE"]["value"] == mount["mountPath"] + "/signing-key"
    svc = one(objs, "Service", "fal-serverless-gateway")
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in container_ports
    listens = {"http": "FAL_GATEWAY_LISTEN", "queue": "FAL_GATEWAY_QUEUE_LISTEN",
               "metrics": "FAL_GATEWAY_ADMIN_LISTEN"}
    for name, var in listens.items():
        assert env[var]["value"] == f"0.0.0.0:{container_ports[name]}"
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_ingress_variant(template):
    objs = template(VARIANTS["ingress"])
    ing = one(objs, "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    hosts = {r["host"]: r["http"]["paths"][0]["backend"]["service"] for r in ing["spec"]["rules"]}
    assert hosts == {
        "fal.example.com": {"name": "fal-serverless-gateway", "port": {"name": "http"}},
        "queue.fal.example.com": {"name": "fal-serverless-gateway", "port": {"name": "queue"}},
    }
    assert ing["spec"]["tls"] == [{"secretName": "fal-tls",
                                   "hosts": ["fal.example.com", "queue.fal.example.com"]}]
    svc_ports = {p["name"] for p in one(objs, "Service", "fal-serverless-gateway")["spec"]["ports"]}
    assert {"http", "queue"} <= svc_ports
    # The gateway matches bare hosts; the operator writes status URLs with the scheme.
    env = {name: env_of(one(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0])
           for name in ("fal-serverless-operator", "fal-serverless-gateway")}
    assert env["fal-serverless-gateway"]["FAL_GATEWAY_DOMAIN"]["value"] == "fal.example.com"
    assert env["fal-serverless-operator"]["FAL_GATEWAY_DOMAIN"]["value"] == "https://fal.example.com"


def test_sidecars_get_the_gateways_webhook_allow_list(template):
    """Sidecars and the gateway deliver webhooks from one outbox: the operator passes
    gateway.webhookAllow on to every sidecar (FAL_WEBHOOK_ALLOW of the controller)."""
    objs = template({"gateway": {"webhookAllow": ["198.18.0.0/15", "hooks.internal"]}})
    env = {name: env_of(one(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0])
           for name in ("fal-serverless-operator", "fal-serverless-gateway")}
    for name in env:
        assert env[name]["FAL_WEBHOOK_ALLOW"]["value"] == "198.18.0.0/15,hooks.internal", name
    assert "FAL_WEBHOOK_ALLOW" not in env_of(one(template({}), "Deployment", "fal-serverless-operator")
                                             ["spec"]["template"]["spec"]["containers"][0])


def test_status_urls_name_the_gateway_service_without_a_domain(template):
    """Function pods admit only the gateway (NetworkPolicy): status URLs must name the
    gateway's Service (operator/src/status.rs turns these into the URLs)."""
    objs = template({})
    env = env_of(one(objs, "Deployment", "fal-serverless-operator")["spec"]["template"]["spec"]["containers"][0])
    host = f"fal-serverless-gateway.{NAMESPACE}.svc.cluster.local"
    ports = {p["name"]: p["port"] for p in one(objs, "Service", "fal-serverless-gateway")["spec"]["ports"]}
    assert env["FAL_GATEWAY_URL"]["value"] == f"http://{host}:{ports['http']}"
    assert env["FAL_GATEWAY_QUEUE_URL"]["value"] == f"http://{host}:{ports['queue']}"


def test_monitoring_variant(template):
    objs = template(VARIANTS["monitoring"])
    monitors = {m["metadata"]["name"]: m for m in by_kind(objs, "ServiceMonitor")}
    assert set(monitors) == {"fal-serverless-operator", "fal-serverless-gateway",
                             "fal-serverless-sidecars"}
    for m in monitors.values():
        assert m["metadata"]["labels"]["release"] == "prom"
    services = by_kind(objs, "Service")
    for name in ("fal-serverless-operator", "fal-serverless-gateway"):
        sel = monitors[name]["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
        assert monitors[name]["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]
    sidecars = monitors["fal-serverless-sidecars"]["spec"]
    assert sidecars["namespaceSelector"] == {"any": True}
    assert sidecars["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "fal-operator"}
    dashboard = json.loads(one(objs, "ConfigMap", "fal-serverless-dashboard")["data"]["fal-serverless.json"])
    assert dashboard["uid"] == "fal-serverless"


def test_sidecar_service_monitor_matches_what_the_operator_renders(template, tmp_path):
    """The sidecars' ServiceMonitor selects the Service the operator renders for a
    function, on a port it has."""
    operator = binary("FAL_OPERATOR_BIN", "fal-operator")
    out = subprocess.run([str(operator), "render", "-f", ROOT / "examples" / "seed-app.yaml"],
                         capture_output=True, text=True, check=True)
    (svc,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Service"]
    monitor = one(template(VARIANTS["monitoring"]), "ServiceMonitor", "fal-serverless-sidecars")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]


# --- the chart in step with the crates ---------------------------------------------------------


def test_chart_version_is_the_crates_version():
    assert chart_meta()["appVersion"] == cargo_version("operator") == cargo_version("sidecar")


def test_chart_crds_are_the_generated_crds():
    names = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert names == ["falfunctions.yaml", "falkeys.yaml"]
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == names
    for name in names:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), \
            f"charts/fal-serverless/crds/{name} differs: cp crds/{name} charts/fal-serverless/crds/"


def test_default_images_are_the_ones_images_sh_and_the_operator_use():
    values = chart_values()
    version = chart_meta()["appVersion"]
    script = (ROOT / "scripts" / "images.sh").read_text()
    repo = re.search(r"REPO=\$\{FAL_IMAGE_REPO:-([^}]+)\}", script).group(1)
    assert values["operator"]["image"]["repository"] == f"{repo}/fal-operator"
    assert values["sidecar"]["image"]["repository"] == f"{repo}/fal-sidecar"
    config = (ROOT / "operator" / "src" / "config.rs").read_text()
    default_sidecar = re.search(r'DEFAULT_SIDECAR_IMAGE: &str = "([^"]+)"', config).group(1)
    assert default_sidecar == f"{repo}/fal-sidecar:{version}"


def help_text(*args):
    operator = binary("FAL_OPERATOR_BIN", "fal-operator")
    return subprocess.run([str(operator), *args, "--help"], capture_output=True, text=True)


def test_every_env_var_the_chart_gives_the_controller_is_read(template):
    helptext = help_text("controller")
    assert helptext.returncode == 0, helptext.stderr
    objs = template(VARIANTS["ingress"])
    c = one(objs, "Deployment", "fal-serverless-operator")["spec"]["template"]["spec"]["containers"][0]
    names = [n for n in env_of(c) if n.startswith("FAL_")]
    unknown = [n for n in names if f"[env: {n}=" not in helptext.stdout]
    assert not unknown, f"fal-operator controller does not read {unknown}"


def test_every_env_var_the_chart_gives_the_gateway_is_read(template):
    helptext = help_text("gateway")
    assert helptext.returncode == 0, helptext.stderr
    values = {"gateway": {"domain": "fal.example.com", "webhookAllow": ["10.0.0.0/8"],
                          "coldStartTimeout": 300}}
    c = one(template(values), "Deployment", "fal-serverless-gateway")["spec"]["template"]["spec"]["containers"][0]
    names = [n for n in env_of(c) if n.startswith("FAL_")]
    unknown = [n for n in names if f"[env: {n}=" not in helptext.stdout]
    assert not unknown, f"fal-operator gateway does not read {unknown}"


@pytest.mark.parametrize("variant", ["defaults", "external-store-url", "ha"])
def test_function_pods_find_every_secret_they_reference(template, variant, tmp_path):
    """The operator, configured by the chart's env, renders a function in each function
    namespace; every Secret its pods reference (store URL, signing key) is one the
    chart puts in that namespace, with that key."""
    objs = template(VARIANTS[variant])
    c = one(objs, "Deployment", "fal-serverless-operator")["spec"]["template"]["spec"]["containers"][0]
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in by_kind(objs, "Secret")}
    env = {}
    for name, e in env_of(c).items():
        if "value" in e:
            env[name] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[name] = base64.b64decode(secrets[(NAMESPACE, ref["name"])]["data"][ref["key"]]).decode()
    env.pop("FAL_CATALOG")  # a path inside the pod; the catalog has its own test
    operator = binary("FAL_OPERATOR_BIN", "fal-operator")
    for ns in VARIANTS[variant].get("functionNamespaces", ["default"]):
        ff = yaml.safe_load((ROOT / "examples" / "seed-app.yaml").read_text())
        ff["metadata"]["namespace"] = ns
        manifest = tmp_path / f"{ns}.yaml"
        manifest.write_text(yaml.safe_dump(ff))
        out = subprocess.run([str(operator), "render", "-f", manifest], env={**env, "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        dep = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
        pod = dep["spec"]["template"]["spec"]
        refs = [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                for ctr in pod["containers"] + pod.get("initContainers", [])
                for e in ctr.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
        refs += [(v["secret"]["secretName"], item["key"]) for v in pod.get("volumes", [])
                 if "secret" in v for item in v["secret"].get("items", [])]
        assert ("fal-serverless-store", "url") in refs, "sidecars read the store URL from the Secret"
        assert ("fal-serverless-signing-key", "signing-key") in refs
        for name, key in refs:
            assert (ns, name) in secrets, f"no Secret {name} in namespace {ns}"
            assert key in secrets[(ns, name)]["data"], f"Secret {ns}/{name} has no key {key}"
        for ctr in pod["containers"] + pod.get("initContainers", []):
            for e in ctr.get("env", []):
                assert "redis://" not in e.get("value", ""), "the store URL leaked into the pod spec"
        # The NetworkPolicy the operator renders with the chart's settings admits this
        # release's gateway pods, in the release namespace.
        policy = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "NetworkPolicy")
        (peer,) = policy["spec"]["ingress"][0]["from"]
        gateway = one(objs, "Deployment", "fal-serverless-gateway")["spec"]["template"]["metadata"]
        assert peer["podSelector"]["matchLabels"].items() <= gateway["labels"].items()
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}


def test_catalog_configmap_is_a_catalog_the_operator_loads(template, tmp_path):
    objs = template(VARIANTS["catalog"])
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(one(objs, "ConfigMap", "fal-serverless-catalog")["data"]["catalog.yaml"])
    ff = yaml.safe_load((ROOT / "examples" / "seed-app.yaml").read_text())
    ff["spec"]["machineType"] = "GPU-RTX4090"
    manifest = tmp_path / "ff.yaml"
    manifest.write_text(yaml.safe_dump(ff))
    operator = binary("FAL_OPERATOR_BIN", "fal-operator")
    out = subprocess.run([str(operator), "render", "-f", manifest, "--catalog", catalog],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    dep = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "rtx4090"}
    app = next(c for c in pod["containers"] if c["name"] == "app")
    assert app["resources"]["requests"]["cpu"] == "8"
    # The default (empty) catalog is accepted too: the built-ins stay.
    catalog.write_text(one(template(), "ConfigMap", "fal-serverless-catalog")["data"]["catalog.yaml"])
    ff["spec"]["machineType"] = "GPU-T4"
    manifest.write_text(yaml.safe_dump(ff))
    out = subprocess.run([str(operator), "render", "-f", manifest, "--catalog", catalog],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# --- dashboard ----------------------------------------------------------------------------------

def test_dashboard_panels_and_metric_names():
    dash = json.loads((CHART / "dashboards" / "fal-serverless.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("queue depth", "running", "cold start", "replicas", "latency"):
        assert topic in titles, f"no {topic} panel"
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bfal_[a-z_]+", e)}
    source = "".join(p.read_text() for d in ("operator/src", "sidecar/src")
                     for p in (ROOT / d).rglob("*.rs"))
    exported = {m for m in used if f'"{m}"' in source}
    missing = used - exported
    assert not missing, f"the dashboard queries metrics nothing exports: {missing}"
