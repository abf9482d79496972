"""Pods and the test share one store on the node, the way the gateway and the sidecars
share Redis in a cluster: the hook for the gateway / scale-to-zero suites."""

from __future__ import annotations

import httpx

from kube import Cluster, wait_until
from test_operator import submit_and_wait


def test_pod_sidecars_use_a_redis_store_on_the_node(cluster: Cluster, crds, make_operator,
                                                     node_redis, namespace):
    op = make_operator("--store-url", node_redis.pod_url)
    name = "redis-app"
    cluster.apply({
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "example/app:1", "command": ["python3", "app.py"],
                 "machineType": "XS", "minReplicas": 1, "maxReplicas": 1,
                 "readinessPath": "/health"},
    })
    dep = wait_until(lambda: cluster.get("deployment", name, namespace), 60, "the Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["initContainers"][0]["env"]}
    assert env["FAL_SIDECAR_STORE"] == node_redis.pod_url, env
    ip = cluster.pod_address(namespace, name, timeout=120)
    result = submit_and_wait(ip, "test", {"via": "redis"})
    assert result["input"] == {"via": "redis"}, result
    # The job went through the Redis on the node, under the function's key prefix.
    keys = node_redis.command("--scan", "--pattern", f"fal:{{{namespace}/{name}}}:*")
    assert keys.strip(), f"no keys of {namespace}/{name} in Redis; operator log:\n{op.log()[-3000:]}"
    with httpx.Client(timeout=10) as http:
        assert http.get(f"http://{ip}:9090/readyz").status_code == 200
