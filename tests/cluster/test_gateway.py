"""The hook for the gateway and scale-to-zero suites: the controller and the gateway,
each as its own ServiceAccount, sharing Redis with the pods. A warm sync call and a
queue submit through the gateway reach a pod at its own address (picked from the
function's EndpointSlices)."""

from __future__ import annotations

import httpx

from kube import Cluster, free_ports, wait_until
from test_operator import RBAC_DENIAL


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
    cluster.apply({
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "example/app:1", "command": ["python3", "app.py"],
                 "machineType": "XS", "minReplicas": 1, "maxReplicas": 1,
                 "readinessPath": "/health"},
    })
    ip = cluster.pod_address(namespace, name, timeout=120)
    wait_until(lambda: ip in cluster.ready_endpoints(namespace, name), 60, "the pod in the EndpointSlices")
    with httpx.Client(timeout=30) as http:
        def healthy():
            assert gateway.running(), f"the gateway exited ({gateway.proc.returncode}), see its log"
            return http.get(f"http://127.0.0.1:{admin}/healthz").status_code == 200

        wait_until(healthy, 30, "the gateway's /healthz")
        r = wait_until(lambda: (lambda r: r.status_code == 200 and r)(
            http.post(f"http://127.0.0.1:{run}/{namespace}/{name}/test", json={"via": "gateway"})),
            60, "a sync call through the gateway")
        assert r.json()["input"] == {"via": "gateway"}, r.text
        sub = http.post(f"http://127.0.0.1:{queue}/{namespace}/{name}/test", json={"q": 1})
        assert sub.status_code in (200, 202), sub.text
        rid = sub.json()["request_id"]
        wait_until(lambda: http.get(f"http://127.0.0.1:{queue}/{namespace}/{name}/requests/{rid}/status")
                   .json().get("status") == "COMPLETED", 60, f"request {rid}")
        res = http.get(f"http://127.0.0.1:{queue}/{namespace}/{name}/requests/{rid}")
        assert res.status_code == 200 and res.json()["input"] == {"q": 1}, res.text
    for proc in (controller, gateway):
        assert not RBAC_DENIAL.findall(proc.log()), proc.log()[-3000:]
