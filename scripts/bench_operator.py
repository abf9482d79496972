#!/usr/bin/env python3
"""The controller's memory with many FalFunctions, in the real control plane.

    scripts/bench_operator.py [--functions 1000] [--operator target/release/fal-operator]

Starts the test cluster (scripts/cluster.sh) unless it is up, applies the CRDs and the
project's RBAC, starts `fal-operator controller` as its ServiceAccount, applies N
FalFunctions at zero (minReplicas 0: Deployments, Services and NetworkPolicies, no pods)
into a fresh namespace, waits until every one has its Deployment and a status, then
samples the controller's RSS for a while. Prints OPERATOR-MEASURE lines: RSS before the
functions, settled RSS, peak (VmHWM), time to reconcile all, and the API writes made.
The namespace is deleted at the end (and the cluster stopped if this script started it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from kube import CLUSTER_SH, Cluster, Operator, wait_until  # noqa: E402


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def settle(pid: int, seconds: float) -> dict:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(status_kib(pid, "VmRSS"))
        time.sleep(1)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"samples": samples, "hwm": status_kib(pid, "VmHWM"), "seconds": seconds,
            "cpu": (int(stat[11]) + int(stat[12])) / 100}


def report(what: str, m: dict, idle: int, n: int) -> None:
    rss = m["samples"][-1]
    print(f"OPERATOR-MEASURE {what}: RSS settled {rss / 1024:.1f} MiB (min {min(m['samples']) / 1024:.1f}, "
          f"max {max(m['samples']) / 1024:.1f} over {m['seconds']:g} s), peak {m['hwm'] / 1024:.1f} MiB, "
          f"{(rss - idle) / n:.2f} KiB per function over the idle controller; CPU {m['cpu']:.1f} s", flush=True)


def counters(op: Operator) -> dict[str, float]:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=5).read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line.startswith(("fal_operator_reconcil", "fal_operator_writes")))
            if "_bucket" not in k}


def reconciliations(op: Operator) -> int:
    return int(counters(op).get("fal_operator_reconciliations_total", 0))


def function(ns: str, i: int) -> dict:
    return {
        "apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
        "metadata": {"name": f"fn-{i:05d}", "namespace": ns},
        "spec": {"image": "ghcr.io/fal-serverless-k8s/seed-app:0.1.0", "exposedPort": 8080,
                 "machineType": "GPU-T4", "keepAlive": 300, "minReplicas": 0,
                 "maxReplicas": 1, "maxConcurrency": 1, "readinessPath": "/health"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--functions", type=int, default=1000)
    ap.add_argument("--operator", default=str(REPO / "target" / "release" / "fal-operator"))
    ap.add_argument("--keep", action="store_true", help="leave the namespace and its functions")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds of RSS samples after all reconciled")
    args = ap.parse_args()

    import kube
    kube.OPERATOR_BIN = Path(args.operator)
    started = subprocess.run([str(CLUSTER_SH), "status"], capture_output=True).returncode != 0
    if started:
        subprocess.run([str(CLUSTER_SH), "up"], check=True)
    cluster = Cluster()
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    op = None
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                        "crd/falfunctions.fal.serverless.dev")
        first = REPO / "deploy" / "rbac.yaml"
        for path in [first, *sorted(p for p in (REPO / "deploy").glob("rbac*.yaml") if p != first)]:
            cluster.kubectl("apply", "-f", str(path))
        wait_until(lambda: cluster.get("serviceaccount", "fal-operator", "fal-system"), 30, "ServiceAccount")
        others = len(cluster.json("get", "falfunctions", "-A", "-o", "json")["items"])
        if others:
            print(f"warning: {others} FalFunctions exist already (a namespace still terminating?): "
                  "they count in every figure below", flush=True)
        cluster.kubectl("create", "namespace", ns)
        work = Path(tempfile.mkdtemp(prefix="bench-operator-"))
        op = Operator(cluster, work, "--store-url", "redis://127.0.0.1:6379/0",
                      env={"RUST_LOG": "warn"}).start()
        time.sleep(3)
        pid = op.proc.pid
        idle = status_kib(pid, "VmRSS")
        print(f"OPERATOR-MEASURE before functions: RSS {idle / 1024:.1f} MiB", flush=True)

        t0 = time.monotonic()
        batch = 200
        for start in range(0, args.functions, batch):
            items = [function(ns, i) for i in range(start, min(start + batch, args.functions))]
            cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        applied = time.monotonic() - t0

        last = [None]

        def reconciled() -> bool:
            if not op.running():
                raise SystemExit(f"the controller exited; its log: {op.log_path}")
            deps = cluster.json("get", "deployments", "-n", ns, "-o", "json")["items"]
            fns = cluster.json("get", "falfunctions", "-n", ns, "-o", "json")["items"]
            with_status = sum(1 for f in fns if (f.get("status") or {}).get("conditions"))
            if (len(deps), with_status) != last[0]:
                last[0] = (len(deps), with_status)
                print(f"  {len(deps)} deployments, {with_status} statuses, RSS "
                      f"{status_kib(pid, 'VmRSS') / 1024:.1f} MiB", flush=True)
            return len(deps) == args.functions and with_status == args.functions

        wait_until(reconciled, 1200, f"{args.functions} functions reconciled", interval=5)
        done = time.monotonic() - t0
        first = settle(pid, args.settle)
        print(f"OPERATOR-MEASURE functions {args.functions}: applied in {applied:.1f} s, all reconciled "
              f"{done:.1f} s after the first apply", flush=True)
        report("while they were created", first, idle, args.functions)
        print(f"OPERATOR-MEASURE first controller's counters: {counters(op)}", flush=True)

        # What a restarted (or failed-over) controller holds: it lists every function and
        # its objects at once and reconciles them all.
        op.stop()
        op = Operator(cluster, work, "--store-url", "redis://127.0.0.1:6379/0",
                      env={"RUST_LOG": "warn"}).start()
        pid = op.proc.pid
        t1 = time.monotonic()
        wait_until(lambda: reconciliations(op) >= args.functions, 600,
                   f"the restarted controller reconciling {args.functions} functions", interval=1)
        print(f"OPERATOR-MEASURE restarted: {args.functions} reconciled in {time.monotonic() - t1:.1f} s",
              flush=True)
        report("restarted with them", settle(pid, args.settle), idle, args.functions)
        print(f"OPERATOR-MEASURE restarted controller's counters: {counters(op)}", flush=True)
        return 0
    finally:
        # The functions are deleted while a controller still runs (their objects go with
        # them), then the namespace, waited for: the next run starts clean.
        if not args.keep:
            cluster.kubectl("delete", "falfunctions", "--all", "-n", ns, "--timeout=300s", check=False, timeout=310)
        if op is not None:
            op.stop()
        if not args.keep:
            cluster.kubectl("delete", "namespace", ns, "--timeout=300s", check=False, timeout=310)
        if started:
            subprocess.run([str(CLUSTER_SH), "down"], check=False)


if __name__ == "__main__":
    sys.exit(main())
