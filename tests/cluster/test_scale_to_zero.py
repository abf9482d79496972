"""Scale to zero in a real cluster: `fal-operator controller` (with the autoscaler, on
the node's Redis) and `fal-operator gateway`, each as its own ServiceAccount, in front
of a `minReplicas: 0` FalFunction whose pods run under the test kubelet.

- The function starts warm (max(min, 1) = 1 replica) and the autoscaler takes its
  Deployment to 0 with no load.
- A queue submit through the gateway at zero wakes it: the `scale` subresource goes
  0 → 1 (a server-side apply as field manager `fal-autoscaler`, which the Deployment's
  managedFields show as the owner of spec.replicas), a pod starts and runs the request;
  keepAlive later the scale is back at 0 (still owned by `fal-autoscaler`), the pod drains through its preStop hook and goes away,
  and the gateway still serves the status and the result from the store.
- A sync call through the gateway at zero is held through the cold start and answered.

All waits are polling loops with deadlines sized for a loaded 2-core machine.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from kube import STATE, Cluster, Operator, free_ports, wait_until
from test_operator import RBAC_DENIAL, ready_condition

KEEP_ALIVE = 3
# Deadlines (seconds): generous, the CI machine has 2 cores.
SCALE_DEADLINE = 120   # the autoscaler acting (it needs only keepAlive + a tick)
COLD_START = 180       # 0 → a Ready pod that has run the request
DRAIN_DEADLINE = 120   # the pod's preStop, SIGTERM and removal


class Function:
    """A scale-to-zero function with the controller and the gateway in front of it."""

    def __init__(self, cluster: Cluster, namespace: str, name: str,
                 controller: Operator, gateway: Operator, run: int, queue: int, admin: int):
        self.cluster, self.ns, self.name = cluster, namespace, name
        self.controller, self.gateway = controller, gateway
        self.run_url = f"http://127.0.0.1:{run}/{namespace}/{name}"
        self.queue_url = f"http://127.0.0.1:{queue}/{namespace}/{name}"
        self.admin_url = f"http://127.0.0.1:{admin}"

    # --- the Deployment and its pods -----------------------------------------------
    def replicas(self) -> int | None:
        """`kubectl get deploy NAME -o jsonpath={.spec.replicas}` (None before it exists)."""
        proc = self.cluster.kubectl("get", "deploy", self.name, "-n", self.ns,
                                    "-o", "jsonpath={.spec.replicas}", check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        return int(proc.stdout.strip())

    def wait_replicas(self, want: int, timeout: float, what: str) -> None:
        def check():
            self.alive()
            return self.replicas() == want

        wait_until(check, timeout, f"{self.ns}/{self.name} spec.replicas == {want} ({what})", interval=0.2)

    def pod_names(self) -> set[str]:
        return {p["metadata"]["name"] for p in self.cluster.pods(self.ns, self.name)}

    def wait_no_pods(self, timeout: float = DRAIN_DEADLINE) -> None:
        wait_until(lambda: not self.pod_names(), timeout, f"every pod of {self.ns}/{self.name} gone")

    def alive(self) -> None:
        for proc in (self.controller, self.gateway):
            assert proc.running(), (f"{proc.args[1]} exited ({proc.proc.returncode}):\n"
                                    f"{proc.log()[-3000:]}")

    # --- the FalFunction ---------------------------------------------------------------
    def ff(self) -> dict:
        return self.cluster.json("get", "falfunction", self.name, "-n", self.ns)

    def events(self) -> list[dict]:
        """The events about the FalFunction (the core/v1 view of events.k8s.io)."""
        return self.cluster.json("get", "events", "-n", self.ns, "--field-selector",
                                 f"involvedObject.name={self.name},involvedObject.kind=FalFunction")["items"]

    def scale_events(self) -> set[str]:
        """Reasons of the autoscaler's events (reported by `fal-autoscaler`)."""
        return {e["reason"] for e in self.events() if e.get("reportingComponent") == "fal-autoscaler"}

    def replicas_managers(self) -> list[str]:
        """Field managers owning the Deployment's spec.replicas (managedFields)."""
        dep = self.cluster.get("deployment", self.name, self.ns) or {}
        return [f"{m.get('manager')}/{m.get('operation')}/{m.get('subresource', '')}"
                for m in dep.get("metadata", {}).get("managedFields", [])
                if "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {})]


@pytest.fixture
def zero_function(cluster: Cluster, crds, make_operator, node_redis, namespace, tmp_path):
    """Controller + gateway on the node's Redis, and a `minReplicas: 0` function that has
    already been scaled to zero by the autoscaler (no pod left)."""
    controller = make_operator("--store-url", node_redis.pod_url)
    run, queue, admin = free_ports(3)
    gateway = make_operator(
        "--store", node_redis.url, "--listen", f"127.0.0.1:{run}",
        "--queue-listen", f"127.0.0.1:{queue}", "--admin-listen", f"127.0.0.1:{admin}",
        "--data-dir", str(tmp_path / "gateway"),
        subcommand="gateway", service_account="fal-gateway")
    name = "zero-app"
    cluster.apply({
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "example/app:1", "command": ["python3", "app.py"],
                 "machineType": "XS", "minReplicas": 0, "maxReplicas": 1,
                 "keepAlive": KEEP_ALIVE, "readinessPath": "/health",
                 # Scale to zero is the subject here; keys are test_gateway.py's.
                 "auth": "public"},
    })
    fn = Function(cluster, namespace, name, controller, gateway, run, queue, admin)
    try:
        with httpx.Client(timeout=30) as http:
            def healthy():
                fn.alive()
                return http.get(f"{fn.admin_url}/healthz").status_code == 200

            wait_until(healthy, 60, "the gateway's /healthz")

        # The controller creates the Deployment warm (max(min, 1) = 1 replica) ...
        wait_until(lambda: fn.replicas() is not None, 60, f"the Deployment {namespace}/{name}")
        # ... and with nothing queued, running or arriving the autoscaler takes it to zero.
        fn.wait_replicas(0, SCALE_DEADLINE, "scaled to zero with no load")
        fn.wait_no_pods()
        yield fn
    finally:
        # Remove the function while its store and operators still run (the namespace
        # fixture deletes the namespace without waiting, then Redis and the operators
        # stop): its pods drain against a live Redis and are gone before the next test.
        cluster.kubectl("delete", "falfunction", name, "-n", namespace, "--wait=true",
                        "--timeout=60s", check=False, timeout=90)
        wait_until(lambda: not fn.pod_names() and cluster.get("deployment", name, namespace) is None,
                   DRAIN_DEADLINE, f"the pods and Deployment of {namespace}/{name} gone")


def no_rbac_denials(fn: Function) -> None:
    for proc in (fn.controller, fn.gateway):
        denials = RBAC_DENIAL.findall(proc.log())
        assert not denials, f"{proc.args[1]} hit RBAC denials: {denials}"


def test_queue_submit_wakes_a_function_at_zero_and_it_scales_back(zero_function: Function):
    fn = zero_function
    cluster = fn.cluster
    assert fn.replicas() == 0 and not fn.pod_names()

    # The FalFunction at zero: still Ready (reason ScaledToZero), desiredReplicas filled in.
    def at_zero_status():
        ff = fn.ff()
        cond = ready_condition(ff)
        st = ff.get("status", {})
        return (cond.get("status") == "True" and cond.get("reason") == "ScaledToZero"
                and st.get("desiredReplicas") == 0) and ff

    wait_until(at_zero_status, 60, "FalFunction Ready/ScaledToZero with status.desiredReplicas 0")

    with httpx.Client(timeout=30) as http:
        # Submit through the gateway's queue host: answered at once, from the store.
        body = {"wake": "queue"}
        sub = http.post(f"{fn.queue_url}/test", json=body)
        assert sub.status_code in (200, 202), sub.text
        rid = sub.json()["request_id"]

        # The autoscaler wakes the function: the scale subresource goes 0 → 1.
        fn.wait_replicas(1, SCALE_DEADLINE, "woken by the queue submit")
        # ... as the owner of spec.replicas, through the scale subresource.
        assert "fal-autoscaler/Apply/scale" in fn.replicas_managers(), fn.replicas_managers()

        # A pod starts, claims the request from Redis and runs it.
        woken = wait_until(lambda: fn.pod_names(), COLD_START, "a pod of the woken function")

        def completed():
            fn.alive()
            s = http.get(f"{fn.queue_url}/requests/{rid}/status")
            assert s.status_code in (200, 202), s.text
            return s.json().get("status") == "COMPLETED" and s.json()

        wait_until(completed, COLD_START, f"request {rid} COMPLETED (polled through the gateway)",
                   interval=0.5)
        res = http.get(f"{fn.queue_url}/requests/{rid}")
        assert res.status_code == 200, res.text
        assert res.json()["input"] == body, res.text
        assert res.json()["message"] == "Hello from fal-serverless!", res.text

        # keepAlive after the completion the autoscaler takes it back to zero, and the
        # pod goes through its preStop hook (the sidecar's drain) and away.
        fn.wait_replicas(0, SCALE_DEADLINE, f"back to zero {KEEP_ALIVE}s after the last request")
        # The apply keeps its ownership at zero (a merge patch to 0 used to drop it).
        assert "fal-autoscaler/Apply/scale" in fn.replicas_managers(), fn.replicas_managers()
        fn.wait_no_pods()
        kubelet_log = (STATE / "logs" / "test-kubelet.log").read_text(errors="replace")
        for pod in woken:
            assert f"pod {fn.ns}/{pod} container app: preStop hook done" in kubelet_log, \
                f"no preStop hook ran for {pod}"

        # At zero the gateway still serves the status and the result from the store,
        # and reading them does not wake the function.
        s = http.get(f"{fn.queue_url}/requests/{rid}/status")
        assert s.status_code == 200 and s.json()["status"] == "COMPLETED", s.text
        res = http.get(f"{fn.queue_url}/requests/{rid}")
        assert res.status_code == 200 and res.json()["input"] == body, res.text
        assert fn.replicas() == 0

    # The autoscaler's events on the FalFunction, and its status.
    wait_until(lambda: {"ScaledUp", "ScaledDown"} <= fn.scale_events(), 60,
               "ScaledUp and ScaledDown events from fal-autoscaler on the FalFunction")
    wait_until(at_zero_status, 60, "FalFunction Ready/ScaledToZero again")
    no_rbac_denials(fn)


def test_sync_call_at_zero_is_held_through_a_cold_start(zero_function: Function):
    fn = zero_function
    assert fn.replicas() == 0 and not fn.pod_names()
    body = {"wake": "sync"}

    def call() -> httpx.Response:
        # Held by the gateway until a replica is Ready (the cold start), then proxied.
        with httpx.Client(timeout=httpx.Timeout(30, read=COLD_START + 60)) as http:
            return http.post(f"{fn.run_url}/test", json=body)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call)
        # The held call is load: the autoscaler wakes the function while it waits.
        wait_until(lambda: pending.done() or fn.replicas() == 1, SCALE_DEADLINE,
                   "spec.replicas == 1 (woken by the held sync call)", interval=0.2)
        if pending.done():
            r = pending.result()
            assert fn.replicas() == 1, f"the sync call ended before any wake: {r.status_code} {r.text}"
        r = pending.result(timeout=COLD_START + 90)
    assert r.status_code == 200, r.text
    assert r.json()["input"] == body, r.text
    assert r.json()["message"] == "Hello from fal-serverless!", r.text

    # Idle again: back to zero, no pod left, with a ScaledUp and a ScaledDown event.
    fn.wait_replicas(0, SCALE_DEADLINE, f"back to zero {KEEP_ALIVE}s after the sync call")
    fn.wait_no_pods()
    wait_until(lambda: {"ScaledUp", "ScaledDown"} <= fn.scale_events(), 60,
               "ScaledUp and ScaledDown events from fal-autoscaler on the FalFunction")
    wait_until(lambda: fn.ff().get("status", {}).get("desiredReplicas") == 0, 60,
               "status.desiredReplicas 0")
    no_rbac_denials(fn)
