"""`scripts/cluster.sh down` leaves the machine as `up` found it, and two clusters run
side by side. The test starts a second cluster of its own (its own FAL_CLUSTER_NET,
FAL_CLUSTER_PORT and FAL_CLUSTER_STATE, so the session cluster is not disturbed), gives
it a pod with a claim and a mount point of its own, and compares what the host shows
before `up` and after `down`: the whole nftables ruleset (kube-proxy's rules live in
the cluster's own network namespace, never on the host), and the links, network
namespaces, routes, addresses and mounts of that cluster's network; its processes are
gone, its volume directory and mount point too. Everything the session cluster (or
anyone else) changes meanwhile is filtered out by the second cluster's names."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from kube import CLUSTER_SH, STATE, Cluster, wait_until

UP_TIMEOUT = 600  # a first build of the binaries happens before (cluster fixture)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_slot() -> tuple[int, int]:
    """A network number and apiserver port no cluster of this machine uses (run.sh
    hands out 0-20 with 16443 + 10 n; this test takes 24-31, the last that cluster.sh has)."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for net in range(24, 32):
        port = 20000 + 10 * (net - 24)
        if f" falk{net}:" in links or f" falk{net}@" in links:
            continue
        if all(port_free(p) for p in range(port, port + 6)):
            return net, port
    pytest.skip("no free network number/port for a second cluster")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def service_net(net: int) -> str:
    """The first /24 of network `net`'s Service range (scripts/cluster.sh: 198.19.8N.0/21)."""
    return f"198.19.{8 * net}."


def snapshot(net: int, state: Path) -> dict:
    """What the host shows that a cluster on network `net` could have added."""
    mine = re.compile(rf"\bfalk{net}(svc|-\d+|h\d+|p\d+)?\b|198\.18\.{net}\.|{re.escape(service_net(net))}|"
                      rf"{re.escape(str(state))}")
    return {
        "nftables": run("nft", "list", "ruleset"),
        "links": [l for l in run("ip", "-o", "link").splitlines() if mine.search(l)],
        "netns": [l for l in run("ip", "netns", "list").splitlines() if mine.search(l)],
        "routes": [l for l in run("ip", "route", "show", "table", "all").splitlines() if mine.search(l)],
        "addresses": [l for l in run("ip", "-o", "addr").splitlines() if mine.search(l)],
        "mounts": [l for l in Path("/proc/self/mountinfo").read_text().splitlines() if mine.search(l)],
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def dns_answers(kubelet_bin: Path, server: str) -> bool:
    return subprocess.run([str(kubelet_bin), "dns-query", server, "kubernetes.default.svc.cluster.local."],
                          capture_output=True).returncode == 0


def test_down_removes_everything_up_added_and_two_clusters_coexist(cluster: Cluster, tmp_path):
    net, port = free_slot()
    state = tmp_path / "state"
    env = {**os.environ, "FAL_CLUSTER_NET": str(net), "FAL_CLUSTER_PORT": str(port),
           "FAL_CLUSTER_STATE": str(state)}
    session_dns = cluster.json("get", "service", "kube-dns", "-n", "kube-system")["spec"]["clusterIP"]
    kubelet_bin = STATE / "bin" / "test-kubelet"
    pv_root = Path("/tmp/hostpath_pv")  # the controller manager's hostPath provisioner
    pv_root_before = pv_root.exists()
    before = snapshot(net, state)
    assert not before["links"] and not before["netns"], before  # nothing of it yet

    t0 = time.monotonic()
    subprocess.run([str(CLUSTER_SH), "up"], env=env, check=True, timeout=UP_TIMEOUT)
    up_seconds = time.monotonic() - t0
    try:
        second = Cluster(state / "kubeconfig")
        # Both clusters route their Services and answer names at the same time.
        assert dns_answers(kubelet_bin, f"{service_net(net)}10")
        assert dns_answers(kubelet_bin, session_dns)
        # Something of everything down has to remove: a claim's directory, a mount
        # point made on the host, pods, kube-proxy's rules (in its namespace).
        mount_point = f"/var/lib/fal-teardown-{uuid.uuid4().hex[:8]}"
        second.apply(yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": "default"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "holder", "namespace": "default"},
             "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"],
                                      "volumeMounts": [{"name": "data", "mountPath": mount_point}]}],
                      "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}},
        ]))
        second.kubectl("wait", "--for", "condition=Ready", "pod/holder", "--timeout", "60s", timeout=70)
        pv = second.json("get", "pv")["items"][0]
        volume_dir = pv["spec"]["hostPath"]["path"]
        assert os.path.isdir(volume_dir) and os.path.isdir(mount_point)
        rules = run("ip", "netns", "exec", f"falk{net}svc", "nft", "list", "table", "ip", "kube-proxy")
        assert f"{service_net(net)}10" in rules  # kube-dns, programmed by this cluster's kube-proxy
        assert "kube-proxy" not in before["nftables"]
        pids = [int(p.read_text()) for p in (state / "run").glob("*.pid")]
        pids += [int(p) for p in run("ip", "netns", "pids", f"falk{net}svc").split()]
        assert len(pids) >= 7, pids  # 6 components + the pod's process at least
    finally:
        t1 = time.monotonic()
        subprocess.run([str(CLUSTER_SH), "down"], env=env, check=True, timeout=120)
        down_seconds = time.monotonic() - t1
    print(f"second cluster: up {up_seconds:.1f} s, down {down_seconds:.1f} s")

    after = snapshot(net, state)
    assert after == before
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not alive, f"processes of the second cluster still running: {alive}"
    assert not processes_mentioning(str(state)), "a process still refers to the state directory"
    assert not os.path.exists(volume_dir), volume_dir
    # Its parent goes too, unless it was there before or holds another cluster's volumes.
    assert not pv_root.exists() or pv_root_before or any(pv_root.iterdir())
    assert not os.path.exists(mount_point), mount_point
    # The session cluster did not notice.
    assert dns_answers(kubelet_bin, session_dns)
    wait_until(lambda: cluster.kubectl("get", "--raw", "/readyz").stdout == "ok", 10, "session apiserver")
