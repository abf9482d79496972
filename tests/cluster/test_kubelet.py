"""The test kubelet keeps the pod contract the operator relies on: one network identity
and shared volumes per pod, env from the downward API, restarts, preStop hooks and the
grace period on deletion."""

from __future__ import annotations

import os
import time

import httpx

from kube import Cluster, wait_until


def pod(name: str, namespace: str, containers: list[dict], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"test": name}},
            "spec": {"containers": containers, **spec}}


def status(cluster: Cluster, name: str, namespace: str) -> dict:
    return cluster.json("get", "pod", name, "-n", namespace)["status"]


def is_ready(st: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))


def test_containers_share_the_pod_network_and_volumes(cluster: Cluster, namespace):
    """One container writes its pod IP (downward API, $(VAR) expansion) into an emptyDir;
    the other serves that directory on the pod's address; a readiness probe gates Ready."""
    writer = {"name": "writer", "image": "busybox",
              "command": ["sh", "-c", "echo -n $(POD_IP) > /pod-data/ip && sleep 3600"],
              "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
              "volumeMounts": [{"name": "data", "mountPath": "/pod-data"}]}
    server = {"name": "server", "image": "python",
              "command": ["python3", "-m", "http.server", "8000", "--directory", "/pod-data"],
              "readinessProbe": {"httpGet": {"path": "/ip", "port": 8000}, "periodSeconds": 1},
              "volumeMounts": [{"name": "data", "mountPath": "/pod-data", "readOnly": True}]}
    cluster.apply(pod("shared", namespace, [writer, server],
                      volumes=[{"name": "data", "emptyDir": {}}]))
    st = wait_until(lambda: (lambda s: is_ready(s) and s)(status(cluster, "shared", namespace)),
                    60, "pod shared Ready")
    ip = st["podIP"]
    assert ip.startswith(cluster.node_ip().rsplit(".", 1)[0] + "."), ip
    assert httpx.get(f"http://{ip}:8000/ip", timeout=5).text == ip
    # The volume is the pod's own: only an empty mount point shows on the host, and
    # it goes with the pod.
    assert not os.path.exists("/pod-data/ip")
    assert {c["name"]: c["ready"] for c in st["containerStatuses"]} == {"writer": True, "server": True}
    cluster.kubectl("delete", "pod", "shared", "-n", namespace, "--grace-period", "1", "--wait=true")
    assert not os.path.exists("/pod-data")


def test_a_volume_over_the_kubelets_own_directory_hides_no_later_volume(cluster: Cluster, namespace):
    """Volume sources live in the kubelet's state dir. An emptyDir mounted over a
    directory that holds that state (the chart mounts one at /tmp; CI clones under /tmp)
    must not hide the sources of the volumes mounted after it, resolv.conf, nor the
    "image" directory a container without workingDir starts in."""
    from kube import STATE
    covered = str(STATE.resolve().parent)
    script = (f'test -z "$(ls -A {covered})" && echo covered > /pod-data/ok && '
              'grep -q nameserver /etc/resolv.conf && cat /pod-data/ok && sleep 3600')
    cluster.apply(pod("cover", namespace, [{
        "name": "c", "image": "busybox", "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "cover", "mountPath": covered},
                         {"name": "data", "mountPath": "/pod-data"}]}],
        volumes=[{"name": "cover", "emptyDir": {}}, {"name": "data", "emptyDir": {}}]))

    # The log can show "covered" before the kubelet has posted the container as running
    # (a fresh-clone CI run read the status in between): wait for both.
    def started():
        p = cluster.json("get", "pod", "cover", "-n", namespace)
        cs = (p.get("status", {}).get("containerStatuses") or [{}])[0]
        return "covered" in cluster.pod_log(p, "c") and "running" in cs.get("state", {}) and p

    p = wait_until(started, 60, "the container to see both volumes and run")
    cs = p["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 0 and "running" in cs["state"], cs


def test_failed_container_restarts(cluster: Cluster, namespace):
    cluster.apply(pod("crash", namespace, [{"name": "c", "image": "busybox",
                                            "command": ["sh", "-c", "sleep 0.2; exit 3"]}]))

    def restarted():
        cs = status(cluster, "crash", namespace).get("containerStatuses", [{}])[0]
        return cs.get("restartCount", 0) >= 1 and cs

    cs = wait_until(restarted, 60, "a restart of the crashing container")
    term = cs["state"].get("terminated")
    assert term is None or term["exitCode"] == 3, cs


def test_failing_liveness_probe_restarts_the_container(cluster: Cluster, namespace):
    cluster.apply(pod("unwell", namespace, [{
        "name": "c", "image": "busybox", "command": ["sleep", "3600"],
        "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2},
    }], terminationGracePeriodSeconds=2))

    def restarted():
        cs = status(cluster, "unwell", namespace).get("containerStatuses", [{}])[0]
        return cs.get("restartCount", 0) >= 1 and cs.get("lastState", {}).get("terminated") and cs

    cs = wait_until(restarted, 60, "a restart after the liveness probe failed")
    assert cs["lastState"]["terminated"]["exitCode"] == 143, cs  # SIGTERM


def test_deletion_runs_prestop_then_kills_after_the_grace_period(cluster: Cluster, namespace, tmp_path):
    """preStop (exec, in the pod) runs first; a process ignoring SIGTERM is killed when the
    grace period ends; then the kubelet removes the pod."""
    tmp_path.chmod(0o777)
    stubborn = {"name": "stubborn", "image": "busybox",
                "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"],
                "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "date +%s.%N > /marks/prestop"]}}},
                "volumeMounts": [{"name": "marks", "mountPath": "/marks"}]}
    cluster.apply(pod("stubborn", namespace, [stubborn], terminationGracePeriodSeconds=3,
                      volumes=[{"name": "marks", "hostPath": {"path": str(tmp_path)}}]))
    wait_until(lambda: is_ready(status(cluster, "stubborn", namespace)), 60, "pod stubborn Ready")
    t0 = time.time()
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=true", timeout=60)
    elapsed = time.time() - t0
    assert (tmp_path / "prestop").exists(), "the preStop hook did not run"
    # SIGTERM was ignored: the pod went only when SIGKILL came at the end of the grace period.
    assert elapsed >= 2.5, f"deleted after {elapsed:.1f}s, before the 3 s grace period"
    assert elapsed < 30, elapsed


def test_a_followed_log_ends_and_a_failure_reports_the_end_of_the_log(cluster: Cluster, namespace):
    """`kubectl logs -f` returns once the container has exited (the CLI of `function
    serve` follows a build pod so); with terminationMessagePolicy FallbackToLogsOnError a
    failed container's last lines become its termination message (pip's error reaches
    the FalFunction so)."""
    script = "for i in $(seq 1 100); do echo line $i; done; sleep 1; echo the end; exit 2"
    cluster.apply(pod("once", namespace, [{"name": "c", "image": "busybox", "command": ["sh", "-c", script],
                                           "terminationMessagePolicy": "FallbackToLogsOnError"}],
                      restartPolicy="Never"))
    wait_until(lambda: status(cluster, "once", namespace).get("phase") in ("Running", "Failed"), 60,
               "pod once started")
    out = cluster.kubectl("logs", "-f", "once", "-n", namespace, timeout=30).stdout
    assert out.startswith("line 1\n") and out.endswith("the end\n"), out[-200:]
    st = wait_until(lambda: (lambda s: s.get("phase") == "Failed" and s)(status(cluster, "once", namespace)),
                    30, "pod once Failed")
    term = st["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 2
    lines = term["message"].splitlines()
    assert lines[-1] == "the end" and len(lines) == 80 and lines[0] == "line 22", term["message"]
