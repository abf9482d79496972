"""Helpers for the tests against the real control plane (scripts/cluster.sh).

`Cluster` wraps the kubeconfig and kubectl of `.cluster/`; `Operator` is a
`fal-operator` process running as a ServiceAccount (its token from the TokenRequest
API, so the apiserver's RBAC decides what it may do). Later suites (the gateway, scale
to zero) use the same pieces through the fixtures in conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("FAL_CLUSTER_STATE") or REPO / ".cluster")  # as scripts/cluster.sh
CLUSTER_SH = REPO / "scripts" / "cluster.sh"
OPERATOR_BIN = Path(os.environ.get("FAL_OPERATOR_BIN", REPO / "target" / "debug" / "fal-operator"))
SIDECAR_BIN = Path(os.environ.get("FAL_SIDECAR_BIN", REPO / "target" / "debug" / "fal-sidecar"))
FUNCTION_LABEL = "fal.serverless.dev/function"


def wait_until(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.3):
    """Polls `fn` until it returns something truthy (returned); fails after `timeout`
    with the last value or exception in the message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - reported below
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class KubectlError(Exception):
    def __init__(self, args, proc):
        self.proc = proc
        self.stderr = proc.stderr
        super().__init__(f"kubectl {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}")


class Cluster:
    """The running control plane: kubectl with a kubeconfig (admin by default)."""

    def __init__(self, kubeconfig: Path = STATE / "kubeconfig"):
        self.kubeconfig = Path(kubeconfig)
        self.bin = STATE / "bin"
        self.kubectl_bin = self.bin / "kubectl"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(self.kubectl_bin), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise KubectlError(args, proc)
        return proc

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict | None:
        proc = self.kubectl("get", kind, name, "-n", namespace, "-o", "json",
                            "--show-managed-fields", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise KubectlError(("get", kind, name), proc)
        return json.loads(proc.stdout)

    def apply(self, obj: dict | str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        text = obj if isinstance(obj, str) else yaml.safe_dump(obj)
        return self.kubectl("apply", "-f", "-", *extra, input=text, check=check)

    def token(self, namespace: str, service_account: str, duration: str = "2h") -> str:
        return self.kubectl("create", "token", service_account, "-n", namespace,
                            "--duration", duration).stdout.strip()

    def service_account_kubeconfig(self, path: Path, namespace: str, service_account: str) -> Path:
        """A kubeconfig that authenticates as system:serviceaccount:NS:SA (a bound
        token from the TokenRequest API) — not as admin."""
        admin = yaml.safe_load(self.kubeconfig.read_text())
        cluster = admin["clusters"][0]["cluster"]
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fal-test", "cluster": cluster}],
            "users": [{"name": service_account,
                       "user": {"token": self.token(namespace, service_account)}}],
            "contexts": [{"name": "sa", "context": {"cluster": "fal-test", "user": service_account,
                                                    "namespace": namespace}}],
            "current-context": "sa",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def pods(self, namespace: str, function: str) -> list[dict]:
        return self.json("get", "pods", "-n", namespace, "-l", f"{FUNCTION_LABEL}={function}")["items"]

    def ready_pod_ips(self, namespace: str, function: str) -> list[str]:
        """Addresses of the function's Ready pods (their own network namespace's IP)."""
        ips = []
        for pod in self.pods(namespace, function):
            if pod["metadata"].get("deletionTimestamp"):
                continue
            conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if conds.get("Ready") == "True" and pod["status"].get("podIP"):
                ips.append(pod["status"]["podIP"])
        return ips

    def pod_address(self, namespace: str, function: str, timeout: float = 90) -> str:
        """The IP of a Ready pod of the function, waiting for one."""
        return wait_until(lambda: (self.ready_pod_ips(namespace, function) or [None])[0],
                          timeout, f"a Ready pod of {namespace}/{function}")

    def ready_endpoints(self, namespace: str, service: str) -> list[str]:
        """Ready addresses in the Service's EndpointSlices (kube-controller-manager's
        view of the pods: what the gateway routes warm calls to)."""
        slices = self.json("get", "endpointslices", "-n", namespace,
                           "-l", f"kubernetes.io/service-name={service}")["items"]
        return sorted(addr for s in slices for ep in s.get("endpoints") or []
                      if ep.get("conditions", {}).get("ready") for addr in ep["addresses"])

    def node_ip(self) -> str:
        """The node's address on the pod network (reachable from every pod): where a
        test runs servers pods must reach (e.g. a Redis store, a webhook receiver)."""
        node = self.json("get", "nodes")["items"][0]
        return next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")

    def pod_log(self, pod: dict, container: str) -> str:
        """Container output, from the test kubelet's state dir (no kubelet API here)."""
        m = pod["metadata"]
        path = STATE / "kubelet" / "pods" / f"{m['namespace']}_{m['name']}_{m['uid']}" / "logs" / f"{container}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""


class Operator:
    """`fal-operator controller` as a local process authenticated as a ServiceAccount."""

    def __init__(self, cluster: Cluster, workdir: Path, *args: str,
                 namespace: str = "fal-system", service_account: str = "fal-operator",
                 env: dict[str, str] | None = None, subcommand: str = "controller"):
        self.cluster = cluster
        self.kubeconfig = cluster.service_account_kubeconfig(
            workdir / f"{service_account}.kubeconfig", namespace, service_account)
        self.log_path = workdir / f"{subcommand}.log"
        self.metrics_port = free_port()
        self.args = [str(OPERATOR_BIN), subcommand, *args]
        if subcommand == "controller" and not any(a.startswith("--metrics-addr") for a in args):
            self.args += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                    "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Operator":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


class NodeRedis:
    """A `redis-server` on this machine that pods can reach: bound to loopback (for
    processes of the test, e.g. a gateway) and to the node's address on the pod network
    (for sidecars in pods). No persistence; stopped by stop()."""

    def __init__(self, workdir: Path, node_ip: str):
        self.workdir = Path(workdir)
        self.node_ip = node_ip
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """For processes of the test (loopback)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pod_url(self) -> str:
        """For pods (the node's address on the pod network)."""
        return f"redis://{self.node_ip}:{self.port}/0"

    def command(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def start(self) -> "NodeRedis":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", f"127.0.0.1 {self.node_ip}",
             "--protected-mode", "no",  # bound to loopback and the pod network only
             "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
             "--logfile", str(self.workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(lambda: self.command("PING").strip() == "PONG", 15, f"redis-server on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
