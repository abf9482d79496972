"""The hook for the gateway and scale-to-zero suites: the controller and the gateway,
each as its own ServiceAccount, sharing Redis with the pods. A warm sync call and a
queue submit through the gateway reach a pod at its own address (picked from the
function's EndpointSlices), with an API key (a FalKey the gateway watches); disabling,
deleting or re-creating the FalKey takes effect within 2 s; `spec.auth: public` opens
the function."""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from kube import Cluster, free_ports, wait_until
from test_operator import RBAC_DENIAL


def falkey(name: str, namespace: str) -> tuple[dict, str]:
    key_id, secret = str(uuid.uuid4()), secrets.token_hex(32)
    return ({"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalKey",
             "metadata": {"name": name, "namespace": namespace},
             "spec": {"keyId": key_id, "secretSha256": hashlib.sha256(secret.encode()).hexdigest()}},
            f"{key_id}:{secret}")


def refused_within(call, status: int, seconds: float, what: str) -> float:
    """Polls `call()` until it answers `status`; how long it took (bounded by `seconds`)."""
    t0 = time.monotonic()
    wait_until(lambda: call().status_code == status, seconds, what, interval=0.02)
    return time.monotonic() - t0


def test_warm_calls_through_the_gateway(cluster: Cluster, crds, make_operator, node_redis,
                                        namespace, tmp_path):
    controller = make_operator("--store-url", node_redis.pod_url)
    run, queue, admin = free_ports(3)
    gateway = make_operator(
        "--store", node_redis.url, "--listen", f"127.0.0.1:{run}",
        "--queue-listen", f"127.0.0.1:{queue}", "--admin-listen", f"127.0.0.1:{admin}",
        "--data-dir", str(tmp_path / "gateway"),
        subcommand="gateway", service_account="fal-gateway")
    name = "gw-app"
    key_doc, fal_key = falkey("ci", namespace)
    cluster.apply(key_doc)
    function = {
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "example/app:1", "command": ["python3", "app.py"],
                 "machineType": "XS", "minReplicas": 1, "maxReplicas": 1,
                 "readinessPath": "/health"},
    }
    cluster.apply(function)
    ip = cluster.pod_address(namespace, name, timeout=120)
    wait_until(lambda: ip in cluster.ready_endpoints(namespace, name), 60, "the pod in the EndpointSlices")
    key = {"Authorization": f"Key {fal_key}"}
    with httpx.Client(timeout=30) as http:
        def ready():
            assert gateway.running(), f"the gateway exited ({gateway.proc.returncode}), see its log"
            return http.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200

        # Ready means the FalFunctions and the FalKeys are known: the first call works.
        wait_until(ready, 30, "the gateway's /readyz")
        sync = f"http://127.0.0.1:{run}/{namespace}/{name}/test"
        r = wait_until(lambda: (lambda r: r.status_code == 200 and r)(
            http.post(sync, json={"via": "gateway"}, headers=key)),
            60, "a sync call through the gateway")
        assert r.json()["input"] == {"via": "gateway"}, r.text
        sub = http.post(f"http://127.0.0.1:{queue}/{namespace}/{name}/test", json={"q": 1}, headers=key)
        assert sub.status_code in (200, 202), sub.text
        rid = sub.json()["request_id"]
        wait_until(lambda: http.get(f"http://127.0.0.1:{queue}/{namespace}/{name}/requests/{rid}/status",
                                    headers=key).json().get("status") == "COMPLETED", 60, f"request {rid}")
        res = http.get(f"http://127.0.0.1:{queue}/{namespace}/{name}/requests/{rid}", headers=key)
        assert res.status_code == 200 and res.json()["input"] == {"q": 1}, res.text

        # No key: 401 (the function is private by default).
        r = http.post(sync, json={})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Key", r.text

        # Revocation through the API server: disable, enable, delete, each seen in < 2 s.
        call = lambda: http.post(sync, json={}, headers=key)  # noqa: E731
        took = {}
        cluster.kubectl("patch", "falkey", "ci", "-n", namespace, "--type", "merge",
                        "-p", json.dumps({"spec": {"disabled": True}}))
        took["disabled"] = refused_within(call, 401, 2.0, "the disabled key to be refused")
        assert "disabled" in call().json()["detail"]
        cluster.kubectl("patch", "falkey", "ci", "-n", namespace, "--type", "merge",
                        "-p", json.dumps({"spec": {"disabled": False}}))
        took["enabled"] = refused_within(call, 200, 2.0, "the re-enabled key to work")
        cluster.kubectl("delete", "falkey", "ci", "-n", namespace)
        took["deleted"] = refused_within(call, 401, 2.0, "the deleted key to be refused")
        assert "unknown key id" in call().json()["detail"]
        print(f"revocation seen by the gateway after: {took}")

        # spec.auth: public opens the function without a key.
        function["spec"]["auth"] = "public"
        cluster.apply(function)
        refused_within(lambda: http.post(sync, json={}), 200, 10.0, "the public function to answer")
    for proc in (controller, gateway):
        assert not RBAC_DENIAL.findall(proc.log()), proc.log()[-3000:]


def test_websocket_through_the_gateway_to_a_pod(cluster: Cluster, crds, make_operator, node_redis,
                                                 namespace, tmp_path):
    """A WebSocket through `fal-operator gateway` (its own ServiceAccount) to a pod of a
    public function running examples/realtime_app.py: spliced both ways, the app's
    close code back to the client."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from kube import REPO

    make_operator("--store-url", node_redis.pod_url)
    run, queue, admin = free_ports(3)
    gateway = make_operator(
        "--store", node_redis.url, "--listen", f"127.0.0.1:{run}",
        "--queue-listen", f"127.0.0.1:{queue}", "--admin-listen", f"127.0.0.1:{admin}",
        "--data-dir", str(tmp_path / "gateway"),
        subcommand="gateway", service_account="fal-gateway")
    name = "ws-app"
    cluster.apply({
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "example/realtime:1",
                 "command": ["python3", str(REPO / "examples" / "realtime_app.py")],
                 "env": [{"name": "HOST", "value": "0.0.0.0"}],
                 "machineType": "XS", "minReplicas": 1, "maxReplicas": 1, "maxConcurrency": 4,
                 "readinessPath": "/health", "auth": "public"},
    })
    ip = cluster.pod_address(namespace, name, timeout=120)
    wait_until(lambda: ip in cluster.ready_endpoints(namespace, name), 60, "the pod in the EndpointSlices")
    with httpx.Client(timeout=30) as http:
        wait_until(lambda: http.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200, 30,
                   "the gateway's /readyz")
    url = f"ws://127.0.0.1:{run}/{namespace}/{name}/ws/echo"
    c = wait_until(lambda: connect(url, open_timeout=30), 60, "a WebSocket through the gateway")
    with c:
        c.send("to the pod")
        assert c.recv() == "to the pod"
        c.send(b"\x00" * 100_000)
        assert c.recv() == b"\x00" * 100_000
        c.send("close:4001")
        try:
            c.recv()
        except ConnectionClosed:
            pass
        assert c.close_code == 4001
    assert not RBAC_DENIAL.findall(gateway.log()), gateway.log()[-3000:]


def test_two_gateways_never_overrun_a_one_slot_pod(cluster: Cluster, crds, make_operator, node_redis,
                                                   namespace, tmp_path):
    """Issue 20: two gateway replicas route to the same pod (maxConcurrency 1) while its
    worker runs queued requests. Each gateway counts only its own calls; the pod's
    sidecar refuses what would overrun its one slot (`X-Fal-Replica: full`) and the
    gateways send those calls again: all 20 answer 200, the 10 queued complete, and the
    app never sees two calls at once."""
    make_operator("--store-url", node_redis.pod_url)
    gateways = []
    for i in range(2):
        run, queue, admin = free_ports(3)
        make_operator("--store", node_redis.url, "--listen", f"127.0.0.1:{run}",
                      "--queue-listen", f"127.0.0.1:{queue}", "--admin-listen", f"127.0.0.1:{admin}",
                      "--data-dir", str(tmp_path / f"gateway{i}"),
                      subcommand="gateway", service_account="fal-gateway")
        gateways.append((run, queue, admin))
    name = "one-slot"
    # Where each pod's app writes its overlap: outside pytest's 0700 tmp tree, since the
    # app runs as the pod's (non-root) user.
    marks = Path(tempfile.mkdtemp(prefix="fal-overlap-"))
    marks.chmod(0o777)
    cluster.apply({
        "apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "example/app:1", "command": ["python3", "app.py"], "machineType": "XS",
                 "minReplicas": 1, "maxReplicas": 1, "maxConcurrency": 1, "auth": "public",
                 "readinessPath": "/health", "env": [{"name": "APP_OVERLAP_DIR", "value": str(marks)}]},
    })
    ip = cluster.pod_address(namespace, name, timeout=120)
    wait_until(lambda: ip in cluster.ready_endpoints(namespace, name), 60, "the pod in the EndpointSlices")
    with httpx.Client(timeout=120) as http:
        for run, _, admin in gateways:
            wait_until(lambda: http.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200, 30, "a gateway")
            wait_until(lambda: http.post(f"http://127.0.0.1:{run}/{namespace}/{name}/test", json={}).status_code
                       == 200, 60, "a first call through each gateway")
        rids = []
        for i in range(10):
            queue = gateways[i % 2][1]
            r = http.post(f"http://127.0.0.1:{queue}/{namespace}/{name}/slow", json={"seconds": 0.05})
            assert r.status_code == 200, r.text
            rids.append(r.json()["request_id"])
        answers = []

        def call(i: int):
            run = gateways[i % 2][0]
            with httpx.Client(timeout=120) as c:
                answers.append(c.post(f"http://127.0.0.1:{run}/{namespace}/{name}/slow",
                                      json={"seconds": 0.05, "i": i}).status_code)
        threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        queue = gateways[0][1]
        for rid in rids:
            wait_until(lambda: http.get(f"http://127.0.0.1:{queue}/{namespace}/{name}/requests/{rid}/status")
                       .json().get("status") == "COMPLETED", 60, f"request {rid}")
        refused = sum(float(line.split()[-1]) for _, _, admin in gateways
                      for line in http.get(f"http://127.0.0.1:{admin}/metrics").text.splitlines()
                      if line.startswith("fal_gateway_replica_refusals_total"))
    assert answers == [200] * 20, answers
    assert refused > 0, "two gateways, one slot: the pod's sidecar refused some calls, sent again"
    seen = [json.loads(p.read_text()) for p in marks.glob("*.json")]
    assert seen and all(s["max"] == 1 for s in seen), f"the app ran calls at once: {seen}"
