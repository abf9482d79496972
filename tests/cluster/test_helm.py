"""`helm install` of the unmodified chart, end to end, as a user runs it (issue 16):
the real helm, default values (bundled Redis on its PVC, generated signing key and
password) into `fal-system` with `--wait`, the seed app of `examples/seed-app.yaml`
called through the gateway's Service (ClusterIP, via kube-proxy: from the host and,
by its DNS name, from a pod), the official fal-client, a signed webhook, scale from zero
and back, `helm upgrade` keeping the signing key and the queued data, the Redis pod
killed, the operator's leader failover, and `helm uninstall` leaving only what the chart
documents it keeps.

The tests of this module run in order and share one release (module fixture); the
release is uninstalled at the end whatever happens, so the suites after this one do not
meet a second controller. Waits are polls with deadlines sized for a loaded 2-core
machine; the durations printed (HELM-MEASURE lines) are for BENCHMARKS.md, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fal_client
import fal_client.client as fal_client_module
import httpx
import pytest

from kube import OPERATOR_BIN, REPO, STATE, Cluster, wait_until

sys.path.insert(0, str(REPO / "tests" / "e2e"))
from webhook_receiver import WebhookReceiver  # noqa: E402

RELEASE = "fal-serverless"
NS = "fal-system"
GATEWAY = f"{RELEASE}-gateway"
APP_NS = "default"
APP = "seed-app"
COLD = 240  # seconds: a function at zero to an answered call, on a busy machine


def measure(what: str, seconds: float) -> None:
    print(f"HELM-MEASURE {what}: {seconds:.1f} s")


def helm_path() -> str:
    path = os.environ.get("HELM")
    if path:
        return path
    proc = subprocess.run([str(REPO / "scripts" / "test-chart.sh"), "--install-helm"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"no helm: scripts/test-chart.sh --install-helm failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


class Release:
    """The chart installed with helm, and the ways in: the gateway Service's ClusterIP
    (reached from the host through kube-proxy) and an API key of the app's namespace."""

    def __init__(self, cluster: Cluster, helm: str):
        self.cluster, self.helm_bin = cluster, helm
        self.key: str | None = None
        self.http = httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0))

    def helm(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECONFIG": str(STATE / "kubeconfig")}
        proc = subprocess.run([self.helm_bin, *args], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    # -- addresses ------------------------------------------------------------------
    def cluster_ip(self) -> str:
        return self.cluster.json("get", "service", GATEWAY, "-n", NS)["spec"]["clusterIP"]

    @property
    def run(self) -> str:
        return f"http://{self.cluster_ip()}:80"

    @property
    def queue(self) -> str:
        return f"http://{self.cluster_ip()}:8081"

    def auth(self) -> dict:
        return {"Authorization": f"Key {self.key}"}

    # -- the queue API through the Service ----------------------------------------------
    def submit(self, body: dict, path: str = "test", **params) -> str:
        r = self.http.post(f"{self.queue}/{APP_NS}/{APP}/{path}", json=body, headers=self.auth(),
                           params=params)
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def status(self, rid: str) -> dict:
        r = self.http.get(f"{self.queue}/{APP_NS}/{APP}/requests/{rid}/status", headers=self.auth())
        assert r.status_code in (200, 202), r.text
        return r.json()

    def wait_completed(self, rid: str, timeout: float = COLD) -> None:
        wait_until(lambda: self.status(rid)["status"] == "COMPLETED", timeout, f"request {rid} COMPLETED",
                   interval=0.5)

    def result(self, rid: str) -> httpx.Response:
        return self.http.get(f"{self.queue}/{APP_NS}/{APP}/requests/{rid}", headers=self.auth())

    # -- cluster views ------------------------------------------------------------------
    def ready(self, kind: str, name: str) -> bool:
        obj = self.cluster.get(kind, name, NS)
        if not obj:
            return False
        want = obj["spec"].get("replicas", 1)
        st = obj.get("status", {})
        return st.get("readyReplicas", 0) == want and st.get("updatedReplicas", want) == want

    def function_replicas(self) -> int | None:
        d = self.cluster.get("deployment", APP, APP_NS)
        return None if d is None else d["spec"].get("replicas")

    def in_pod(self, name: str, script: str, timeout: float = 120) -> str:
        """Runs `python3 -c script` as a pod of the app's namespace (its own network
        namespace, the cluster's DNS); its output, after it succeeded."""
        self.cluster.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": APP_NS},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "example/python:1",
                                     "command": ["python3", "-c", script]}]},
        })
        pod = wait_until(lambda: (lambda p: p if p and p.get("status", {}).get("phase") in ("Succeeded", "Failed")
                                  else None)(self.cluster.get("pod", name, APP_NS)), timeout, f"pod {name} to finish")
        out = self.cluster.pod_log(pod, "main")
        assert pod["status"]["phase"] == "Succeeded", f"pod {name} failed:\n{out}"
        self.cluster.kubectl("delete", "pod", name, "-n", APP_NS, "--wait=false")
        return out


@pytest.fixture(scope="module")
def release(cluster: Cluster):
    rel = Release(cluster, helm_path())
    try:
        yield rel
    finally:
        cluster.kubectl("delete", "falfunction", APP, "-n", APP_NS, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False)
        subprocess.run([rel.helm_bin, "uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "5m"],
                       env={**os.environ, "KUBECONFIG": str(STATE / "kubeconfig")}, capture_output=True)
        rel.http.close()


def test_install_with_default_values(release: Release, cluster: Cluster):
    """helm install --wait with the defaults: operator, gateway and the bundled Redis
    (on a bound PVC) Ready, the signing key and the Redis password generated."""
    t0 = time.monotonic()
    release.helm("install", RELEASE, "charts/fal-serverless", "-n", NS, "--create-namespace",
                 "--wait", "--timeout", "10m")
    measure("helm install --wait", time.monotonic() - t0)
    for kind, name in [("deployment", f"{RELEASE}-operator"), ("deployment", GATEWAY),
                       ("statefulset", f"{RELEASE}-redis")]:
        assert release.ready(kind, name), cluster.kubectl("get", kind, name, "-n", NS, "-o", "yaml").stdout
    pvcs = cluster.json("get", "pvc", "-n", NS)["items"]
    assert pvcs and all(p["status"]["phase"] == "Bound" for p in pvcs), pvcs
    secrets = {s["metadata"]["name"]: s for s in cluster.json("get", "secrets", "-n", NS)["items"]}
    assert any("signing" in n for n in secrets), sorted(secrets)
    # The gateway's Service answers through kube-proxy from the host.
    jwks = release.http.get(f"{release.queue}/.well-known/jwks.json")
    assert jwks.status_code == 200 and jwks.json()["keys"], jwks.text


def test_seed_app_through_the_gateway_service(release: Release, cluster: Cluster, monkeypatch):
    """A key from `fal-operator key create --apply`; `kubectl apply -f
    examples/seed-app.yaml` (GPU-T4 on the node's GPU labels); then through the
    gateway's ClusterIP: no key 401, the seed's per-app paths, fal-client submit/result
    and the status stream, a sync call; and from a pod by the Service's DNS name."""
    proc = subprocess.run([str(OPERATOR_BIN), "key", "create", "helm-e2e", "-n", APP_NS, "--apply"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": str(STATE / "kubeconfig")})
    assert proc.returncode == 0, proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("FAL_KEY=")]
    release.key = line.split("=", 1)[1]
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", str(REPO / "examples" / "seed-app.yaml"))
    run = f"{release.run}/{APP_NS}/{APP}"

    r = release.http.post(f"{run}/test", json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Key", r.text

    # The first call: held by the gateway until a replica is Ready.
    def first():
        r = release.http.post(f"{run}/test", json={"prompt": "helm"}, headers=release.auth(),
                              timeout=COLD)
        return r if r.status_code == 200 else None
    r = wait_until(first, COLD, "the first call to the seed app", interval=1)
    measure("kubectl apply of the seed app -> first answered call", time.monotonic() - t0)
    assert r.json()["input"] == {"prompt": "helm"}, r.text
    pod = cluster.pods(APP_NS, APP)[0]
    assert pod["spec"].get("affinity") or pod["spec"].get("nodeSelector"), "GPU-T4 places pods by node labels"

    # The seed's own paths (generation A) on the per-app mount of the run host.
    sub = release.http.post(f"{run}/fal/queue/submit/test", json={"seed": 1}, headers=release.auth())
    assert sub.status_code == 200, sub.text
    rid = sub.json()["request_id"]
    got = wait_until(lambda: (lambda r: r if r.status_code == 200 else None)(
        release.http.get(f"{run}/fal/queue/{rid}/get", headers=release.auth())), COLD, "the seed get")
    assert got.json()["input"] == {"seed": 1}, got.text

    # The official Python client, pointed at the Service.
    monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{release.queue}/")
    monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{release.run}/")
    client = fal_client.SyncClient(key=release.key)
    handle = client.submit(f"{APP_NS}/{APP}", {"client": "py"}, path="test")
    assert handle.get()["input"] == {"client": "py"}
    events = [type(e).__name__ for e in handle.iter_events(interval=0.2)]
    assert events[-1] == "Completed", events
    with httpx.stream("GET", f"{release.queue}/{APP_NS}/{APP}/requests/{handle.request_id}/status/stream",
                      headers=release.auth(), timeout=60) as s:
        data = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert data[-1]["status"] == "COMPLETED", data
    assert client.run(f"{APP_NS}/{APP}/test", {"sync": True})["input"] == {"sync": True}

    # From a pod, by the Service's DNS name (cluster DNS + kube-proxy inside the pod network).
    host = f"{GATEWAY}.{NS}.svc.cluster.local"
    out = release.in_pod("helm-e2e-client", f"""
import json, urllib.request
req = urllib.request.Request("http://{host}/{APP_NS}/{APP}/test", data=b'{{"from": "pod"}}',
                             headers={{"Authorization": "Key {release.key}", "Content-Type": "application/json"}})
print(json.load(urllib.request.urlopen(req, timeout=60))["input"])
""")
    assert "{'from': 'pod'}" in out, out


def test_upgrade_keeps_the_signing_key_and_the_queue(release: Release, cluster: Cluster):
    """helm upgrade with changed values (a webhook allow-list, two operator replicas):
    the signing key (JWKS) and a request stored before the upgrade are still there;
    then a webhook signed with that key reaches a receiver on the node."""
    kid = release.http.get(f"{release.queue}/.well-known/jwks.json").json()["keys"][0]["kid"]
    before = release.submit({"before": "upgrade"})
    release.wait_completed(before)
    t0 = time.monotonic()
    release.helm("upgrade", RELEASE, "charts/fal-serverless", "-n", NS, "--reuse-values",
                 "--set", "gateway.webhookAllow={198.18.0.0/15}", "--set", "operator.replicas=2",
                 "--wait", "--timeout", "10m")
    measure("helm upgrade --wait", time.monotonic() - t0)
    assert release.http.get(f"{release.queue}/.well-known/jwks.json").json()["keys"][0]["kid"] == kid
    r = release.result(before)
    assert r.status_code == 200 and r.json()["input"] == {"before": "upgrade"}, r.text

    receiver = WebhookReceiver(f"{release.queue}/.well-known/jwks.json", host=cluster.node_ip()).start()
    try:
        rid = release.submit({"hook": 1}, fal_webhook=receiver.url("/helm"))
        d = receiver.wait_for(rid, timeout=COLD)
        assert d.verified, "the webhook's Ed25519 signature verifies against the JWKS"
        assert d.headers["x-fal-webhook-user-id"] == APP_NS
        assert d.json["status"] == "OK" and d.json["payload"]["input"] == {"hook": 1}
    finally:
        receiver.stop()


def test_scale_to_zero_and_back(release: Release, cluster: Cluster):
    """The seed app with a short keepAlive goes to zero; a submit wakes it, runs, and
    it is back at zero; status and result are served meanwhile from the store."""
    cluster.kubectl("patch", "falfunction", APP, "-n", APP_NS, "--type", "merge",
                    "-p", json.dumps({"spec": {"keepAlive": 3}}))
    wait_until(lambda: release.function_replicas() == 0, 180, "the seed app at zero")
    wait_until(lambda: not cluster.pods(APP_NS, APP), 180, "its pod gone")
    t0 = time.monotonic()
    rid = release.submit({"wake": 1})
    release.wait_completed(rid)
    measure("submit at zero -> COMPLETED", time.monotonic() - t0)
    assert release.result(rid).json()["input"] == {"wake": 1}
    wait_until(lambda: release.function_replicas() == 0, 180, "back at zero")


def test_redis_pod_killed_keeps_acknowledged_requests(release: Release, cluster: Cluster):
    """The Redis pod is deleted with no grace: the StatefulSet starts it again on the
    same PVC, the AOF brings back every acknowledged request (acknowledged more than
    appendfsync's one second before the kill, the chart's documented window)."""
    rids = [release.submit({"n": i}, path="test") for i in range(5)]
    for rid in rids:
        release.wait_completed(rid)
    time.sleep(2)  # past appendfsync everysec: what the chart documents as durable
    redis_pod = f"{RELEASE}-redis-0"
    uid = cluster.get("pod", redis_pod, NS)["metadata"]["uid"]
    cluster.kubectl("delete", "pod", redis_pod, "-n", NS, "--grace-period=0", "--force", "--wait=false")
    wait_until(lambda: (lambda p: p and p["metadata"]["uid"] != uid and release.ready("statefulset", f"{RELEASE}-redis"))(
        cluster.get("pod", redis_pod, NS)), 180, "the Redis pod back")
    for i, rid in enumerate(rids):
        r = wait_until(lambda: (lambda r: r if r.status_code == 200 else None)(release.result(rid)), 60,
                       f"request {rid} readable again")
        assert r.json()["input"] == {"n": i}
    rid = release.submit({"after": "redis"})
    release.wait_completed(rid)


def lease_holder(cluster: Cluster) -> str | None:
    lease = cluster.get("lease", f"{RELEASE}-operator", NS)
    return lease and lease["spec"].get("holderIdentity")


def test_operator_leader_failover(release: Release, cluster: Cluster):
    """Two operator replicas (from the upgrade): the leader's pod is deleted, the other
    takes the Lease and keeps scaling; the requests submitted meanwhile all complete."""
    pods = cluster.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    leader = wait_until(lambda: lease_holder(cluster), 60, "a Lease holder")
    assert leader in {p["metadata"]["name"] for p in pods}, leader
    wait_until(lambda: release.function_replicas() == 0, 180, "the seed app at zero")
    cluster.kubectl("delete", "pod", leader, "-n", NS, "--wait=false")
    rids = [release.submit({"failover": i}) for i in range(3)]
    new = wait_until(lambda: (lambda h: h if h and h != leader else None)(lease_holder(cluster)), 120,
                     "another operator pod to take the Lease")
    for rid in rids:
        release.wait_completed(rid)
    print(f"HELM-MEASURE leader {leader} -> {new}")


def test_uninstall_leaves_only_what_is_kept(release: Release, cluster: Cluster):
    """helm uninstall: nothing of the release is left but the CRDs, the signing-key
    Secrets (helm.sh/resource-policy: keep, so webhook receivers keep verifying) and the
    Redis PVC (a StatefulSet's claims outlive it; delete it to drop the data)."""
    cluster.kubectl("delete", "falfunction", APP, "-n", APP_NS, "--wait=true", "--timeout=120s")
    cluster.kubectl("delete", "falkey", "helm-e2e", "-n", APP_NS, "--ignore-not-found")
    release.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "5m")
    kinds = ("deployments,statefulsets,services,configmaps,secrets,serviceaccounts,roles,rolebindings,"
             "networkpolicies,poddisruptionbudgets,persistentvolumeclaims,leases")
    left = cluster.json("get", kinds, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    cluster_wide = cluster.json("get", "clusterroles,clusterrolebindings", "-l",
                                f"app.kubernetes.io/instance={RELEASE}")["items"]
    assert not cluster_wide, [o["metadata"]["name"] for o in cluster_wide]
    kept = sorted(f"{o['kind']}/{o['metadata']['namespace']}/{o['metadata']['name']}" for o in left)
    for k in kept:
        assert k.startswith("Secret/") and "signing" in k or k.startswith("PersistentVolumeClaim/"), kept
    wait_until(lambda: not cluster.json("get", "pods", "-n", NS, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"],
               120, "the release's pods gone")
    for crd in ("falfunctions.fal.serverless.dev", "falkeys.fal.serverless.dev"):
        assert cluster.get("crd", crd), f"the CRD {crd} is kept"
