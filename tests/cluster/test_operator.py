"""fal-operator against the real control plane, as its own ServiceAccount with the RBAC
the project ships (a missing permission fails these tests), and FalFunction pods
running under the test kubelet with the real fal-sidecar."""

from __future__ import annotations

import re
import time

import httpx
import pytest
import yaml

from kube import FUNCTION_LABEL, REPO, STATE, Cluster, Operator, wait_until

SEED = REPO / "examples" / "seed-app.yaml"
# What the apiserver answers when RBAC refuses the operator's ServiceAccount.
RBAC_DENIAL = re.compile(r'forbidden: User \\?"system:serviceaccount:[^ ]+ cannot [^"]+')


@pytest.fixture(scope="module")
def operator(cluster: Cluster, operator_rbac, _operator_binary, tmp_path_factory):
    """One `fal-operator controller` for the module, as fal-system/fal-operator."""
    import conftest

    args = []
    env = {}
    if conftest.operator_supports("--leader-elect"):
        # Exercises the leader-election Role of the shipped RBAC too.
        args += ["--leader-elect"]
        env["FAL_LEASE_NAMESPACE"] = "fal-system"
    op = Operator(cluster, tmp_path_factory.mktemp("operator"), *args, env=env).start()
    yield op
    op.stop()


@pytest.fixture(autouse=True)
def _attach_operator(request, operator):
    request.node.__dict__.setdefault("_operators", []).append(operator)


def ready_condition(ff: dict) -> dict:
    return next((c for c in ff.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})


def applied_by_operator(obj: dict) -> bool:
    return any(m.get("manager") == "fal-operator" and m.get("operation") == "Apply"
               for m in obj["metadata"].get("managedFields", []))


def submit_and_wait(ip: str, path: str, body: dict, timeout: float = 60) -> dict:
    """The sidecar's queue at the pod's address: submit, poll status, read the result."""
    base = f"http://{ip}:9080"
    with httpx.Client(timeout=10) as http:
        r = http.post(f"{base}/fal/queue/submit/{path}", json=body)
        assert r.status_code in (200, 202), r.text
        rid = r.json()["request_id"]

        def done():
            s = http.get(f"{base}/fal/queue/requests/{rid}/status")
            return s.status_code == 200 and s.json().get("status") == "COMPLETED"

        wait_until(done, timeout, f"request {rid} to complete")
        r = http.get(f"{base}/fal/queue/requests/{rid}/response")
        assert r.status_code == 200, r.text
        return r.json()


def test_seed_app_lifecycle(cluster: Cluster, crds, operator):
    """examples/seed-app.yaml end to end: objects by server-side apply, a GPU pod that
    runs and serves, status, columns, events, a rollout, garbage collection."""
    name, ns = "seed-app", "default"
    cluster.kubectl("apply", "-f", str(SEED))
    try:
        ff = cluster.json("get", "falfunction", name, "-n", ns)
        uid = ff["metadata"]["uid"]

        # Deployment, Service and NetworkPolicy, applied server-side by fal-operator, owned
        # by the FalFunction.
        dep = wait_until(lambda: cluster.get("deployment", name, ns), 60, "the Deployment")
        svc = wait_until(lambda: cluster.get("service", name, ns), 60, "the Service")
        policy = wait_until(lambda: cluster.get("networkpolicy", name, ns), 60, "the NetworkPolicy")
        for obj in (dep, svc, policy):
            assert applied_by_operator(obj), obj["metadata"].get("managedFields")
            owner = obj["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["uid"], owner.get("controller")) == ("FalFunction", uid, True)
        pod_spec = dep["spec"]["template"]["spec"]
        assert [c["name"] for c in pod_spec["initContainers"]] == ["fal-sidecar"]
        assert pod_spec["containers"][0]["image"] == "ghcr.io/fal-serverless-k8s/seed-app:0.1.0"
        assert {p["targetPort"] for p in svc["spec"]["ports"]} >= {"http", "queue"}, svc["spec"]["ports"]
        # Only the gateway pods (of fal-system, the operator's default) reach the run port.
        assert policy["spec"]["podSelector"]["matchLabels"] == {FUNCTION_LABEL: name}
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"port": 9080, "protocol": "TCP"}]
        (peer,) = rule["from"]
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "fal-system"}

        # The GPU-T4 pod lands on the test node (GPU capacity, T4 labels) and gets Ready.
        ip = cluster.pod_address(ns, name, timeout=120)
        pod = cluster.pods(ns, name)[0]
        assert pod["spec"]["nodeName"] == "fal-test-node"
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == "1", limits
        assert ip != cluster.node_ip()

        # Status and conditions.
        def ready():
            cur = cluster.json("get", "falfunction", name, "-n", ns)
            st = cur.get("status", {})
            return (ready_condition(cur).get("status") == "True" and st.get("readyReplicas") == 1
                    and st.get("observedGeneration") == cur["metadata"]["generation"]) and cur

        cur = wait_until(ready, 60, "FalFunction Ready with one ready replica")
        assert ready_condition(cur)["reason"] == "Available"
        types = {c["type"]: c["status"] for c in cur["status"]["conditions"]}
        assert types.get("MachineTypeResolved") == "True", types

        # `kubectl get ff` columns (read by position: an image function's REVISION is empty).
        out = cluster.kubectl("get", "ff", name, "-n", ns).stdout.splitlines()
        cols = [(m.group(), m.start()) for m in re.finditer(r"\S+", out[0])]
        header = [c for c, _ in cols]
        assert header[:8] == ["NAME", "MACHINE", "REVISION", "REPLICAS", "READY", "URL", "STATUS", "AGE"], out
        ends = [start for _, start in cols[1:]] + [None]
        row = {c: out[1][start:end].strip() for (c, start), end in zip(cols, ends)}
        assert (row["NAME"], row["MACHINE"], row["REVISION"], row["REPLICAS"], row["READY"], row["STATUS"]) == \
            (name, "GPU-T4", "", "1", "1", "True"), out

        # Events on the FalFunction.
        def reasons():
            items = cluster.json("get", "events", "-n", ns,
                                 "--field-selector", f"involvedObject.uid={uid}")["items"]
            return {e["reason"] for e in items}

        wait_until(lambda: {"Created", "Ready"} <= reasons(), 30, "Created and Ready events")

        # The pod runs for real: its sidecar serves the queue at the pod's address.
        result = submit_and_wait(ip, "test", {"prompt": "hi"})
        assert result["message"] == "Hello from fal-serverless!", result
        assert result["input"] == {"prompt": "hi"}, result

        # An image change rolls out: a new pod becomes Ready, the old one goes away.
        old_pods = {p["metadata"]["name"] for p in cluster.pods(ns, name)}
        cluster.kubectl("patch", "falfunction", name, "-n", ns, "--type", "merge",
                        "-p", '{"spec": {"image": "ghcr.io/fal-serverless-k8s/seed-app:0.2.0"}}')
        wait_until(lambda: cluster.json("get", "deployment", name, "-n", ns)["spec"]["template"]["spec"]
                   ["containers"][0]["image"].endswith(":0.2.0"), 30, "the Deployment's new image")
        cluster.kubectl("rollout", "status", f"deployment/{name}", "-n", ns, "--timeout", "150s",
                        timeout=170)

        def rolled():
            pods = cluster.pods(ns, name)
            names = {p["metadata"]["name"] for p in pods}
            return (not names & old_pods and len(pods) == 1
                    and pods[0]["spec"]["containers"][0]["image"].endswith(":0.2.0"))

        wait_until(rolled, 90, "only pods of the new image")
        ip = cluster.pod_address(ns, name)
        assert submit_and_wait(ip, "test", {"n": 2})["input"] == {"n": 2}
    finally:
        cluster.kubectl("delete", "-f", str(SEED), "--wait=false", check=False)

    # Deleting the FalFunction garbage-collects everything it owned.
    def collected():
        left = [kind for kind in ("deployment", "service", "networkpolicy")
                if cluster.get(kind, name, ns)]
        rs = cluster.json("get", "replicasets", "-n", ns, "-l", f"{FUNCTION_LABEL}={name}")["items"]
        pods = cluster.pods(ns, name)
        return not left and not rs and not pods

    wait_until(collected, 120,
               "the Deployment, ReplicaSets, pods, Service and NetworkPolicy to be collected")
    denials = RBAC_DENIAL.findall(operator.log())
    assert not denials, f"the operator hit RBAC denials: {denials}"


def test_command_pod_serves_the_queue(cluster: Cluster, crds, operator, namespace):
    """A CPU FalFunction with `command: [python3, app.py]`: two replicas, each in its
    own network namespace with its own address, each sidecar serving submit → result."""
    name = "cmd-app"
    cluster.apply({
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "example/app:1",
            "command": ["python3", "app.py"],
            "machineType": "S",
            "minReplicas": 2,
            "maxReplicas": 2,
            "readinessPath": "/health",
            "env": [{"name": "GREETING", "value": "hello"}],
        },
    })
    ips = wait_until(lambda: (lambda v: len(v) == 2 and v)(cluster.ready_pod_ips(namespace, name)),
                     120, "two Ready pods")
    assert len(set(ips)) == 2, ips
    # The Service's EndpointSlices list both pods as ready (what the gateway routes to).
    wait_until(lambda: cluster.ready_endpoints(namespace, name) == sorted(ips), 60,
               f"EndpointSlices of {name} with {ips}")
    for ip in ips:
        with httpx.Client(timeout=10) as http:
            # The app itself answers on the pod's address (its own netns, port 8080).
            echo = http.post(f"http://{ip}:8080/echo", json={"x": 1}).json()
            assert echo["method"] == "POST", echo
        assert submit_and_wait(ip, "test", {"ip": ip})["input"] == {"ip": ip}
    pod = cluster.pods(namespace, name)[0]
    assert "listening" in cluster.pod_log(pod, "app")
    # `kubectl logs` reaches the test kubelet's API through the apiserver.
    logs = cluster.kubectl("logs", pod["metadata"]["name"], "-n", namespace, "-c", "app").stdout
    assert "listening on http://0.0.0.0:8080" in logs, logs

    # Deleting a pod: preStop (/drain on the sidecar), SIGTERM, and the ReplicaSet
    # replaces it.
    victim = pod["metadata"]["name"]
    cluster.kubectl("delete", "pod", victim, "-n", namespace, "--wait=true", timeout=120)
    wait_until(lambda: (lambda v: len(v) == 2 and v)(cluster.ready_pod_ips(namespace, name)),
               120, "a replacement pod")
    assert victim not in {p["metadata"]["name"] for p in cluster.pods(namespace, name)}
    # The app's preStop hook (GET /drain on the sidecar) ran before SIGTERM.
    kubelet_log = (STATE / "logs" / "test-kubelet.log").read_text(errors="replace")
    assert f"pod {namespace}/{victim} container app: preStop hook done" in kubelet_log


def test_operator_runs_as_its_service_account_not_admin(cluster: Cluster, operator):
    """The operator's credentials are the ServiceAccount's bound token: RBAC, not
    system:masters, decides what it may do."""
    as_operator = ["--kubeconfig", str(operator.kubeconfig)]
    who = cluster.kubectl(*as_operator, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
    assert who == "system:serviceaccount:fal-system:fal-operator", who

    def can(*args: str) -> str:
        proc = cluster.kubectl(*as_operator, "auth", "can-i", *args, check=False)
        return proc.stdout.strip()

    assert can("patch", "deployments.apps", "-n", "default") == "yes"
    assert can("patch", "falfunctions.fal.serverless.dev", "--subresource", "status", "-n", "default") == "yes"
    for denied in (("get", "secrets", "-n", "default"), ("delete", "nodes"),
                   ("create", "clusterrolebindings"), ("delete", "falfunctions.fal.serverless.dev")):
        assert can(*denied) == "no", denied
