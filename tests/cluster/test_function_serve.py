"""The seed's deploy flow in a real control plane (issue 18): `fal-operator function
serve app.py app --alias app` with the seed's own file, against the cluster of the
kubeconfig. The controller (its ServiceAccount, the project's RBAC) builds the
environment in a Job of the runner image (the test kubelet runs the checkout's runner/
with the test's python) into the namespace's environments claim, then rolls the pods
(the runner serving the source ConfigMap, the sidecar injected) and the gateway serves
the seed's calls at the URL the CLI printed. A changed file rolls to a new revision
without a build; the same file again is the same revision; a build that fails (a
requirement pip cannot find) leaves the old revision serving, marks EnvironmentFailed
with pip's error and exits non-zero. flask comes from a local wheelhouse with
--no-index (the air-gapped way; fast, the build touches no index)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime

import httpx
import pytest

from kube import OPERATOR_BIN, Cluster, free_ports, wait_until
from served_files import LINES, SEED
from test_operator import RBAC_DENIAL

@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """flask and its dependencies as wheels (once per run)."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "-d", str(wheels), "flask"], check=True, timeout=300)
    return wheels


def serve(cluster: Cluster, path, namespace: str, wheels, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(OPERATOR_BIN), "function", "serve", str(path), "app", "--alias", "app", "-n", namespace,
         "--auth", "public", "--find-links", str(wheels), "--no-index", "--timeout", "240"],
        capture_output=True, text=True, timeout=300,
        env={"KUBECONFIG": str(cluster.kubeconfig), "FAL_PYTHON": sys.executable,
             "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def announced(proc) -> tuple[str, str, str]:
    m = LINES.match(proc.stdout)
    assert m, f"not the seed's two lines: {proc.stdout!r}"
    return m.groups()


def build_jobs(cluster: Cluster, namespace: str) -> list[dict]:
    return cluster.json("get", "jobs", "-n", namespace,
                        "-l", "fal.serverless.dev/function=app")["items"]


def condition(ff: dict, type_: str) -> dict:
    return next(c for c in ff["status"]["conditions"] if c["type"] == type_)


def test_the_seed_file_served_into_the_cluster(cluster: Cluster, crds, make_operator, node_redis,
                                               namespace, tmp_path, wheelhouse):
    run, queue, admin = free_ports(3)
    # The controller names the gateway in status URLs (the chart passes its Service).
    controller = make_operator("--store-url", node_redis.pod_url,
                               "--gateway-url", f"http://127.0.0.1:{run}",
                               "--gateway-queue-url", f"http://127.0.0.1:{queue}",
                               # The test cluster's hostPath provisioner makes no RWX volume.
                               "--environments-access-mode", "ReadWriteOnce")
    gateway = make_operator(
        "--store", node_redis.url, "--listen", f"127.0.0.1:{run}",
        "--queue-listen", f"127.0.0.1:{queue}", "--admin-listen", f"127.0.0.1:{admin}",
        "--data-dir", str(tmp_path / "gateway"),
        subcommand="gateway", service_account="fal-gateway")
    app = tmp_path / "app.py"
    http = httpx.Client(timeout=120)

    wait_until(lambda: http.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200, 30,
               "the gateway's /readyz")

    # --- first serve: source, build Job, pods, the seed's calls --------------------------
    app.write_text(SEED.format(version=1, keep_alive=300))
    t0 = time.monotonic()
    first = serve(cluster, app, namespace, wheelhouse)
    served_in = time.monotonic() - t0
    alias, rev1, url = announced(first)
    assert (alias, url) == ("app", f"http://127.0.0.1:{run}/{namespace}/app")
    # A sync call is held by the gateway until the first pod is ready.
    r = http.post(f"{url}/test", json={"x": 1})
    first_answer = time.monotonic() - t0
    assert r.status_code == 200 and r.json() == {"version": 1, "input": {"x": 1}}, r.text
    assert "pip install flask" in first.stderr, "the build log reaches the CLI: " + first.stderr[-3000:]
    ff = cluster.json("get", "falfunction", "app", "-n", namespace)
    assert "image" not in ff["spec"] and ff["spec"]["source"]["revision"] == rev1
    assert ff["status"]["revision"] == rev1
    assert condition(ff, "EnvironmentReady")["status"] == "True"
    env = ff["status"]["revisions"][0]["environment"]
    source = cluster.json("get", "configmap", f"app-{rev1}", "-n", namespace)
    assert source["immutable"] is True and source["data"]["app.py"] == app.read_text()
    owner = source["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("FalFunction", ff["metadata"]["uid"])
    (job,) = build_jobs(cluster, namespace)
    assert job["status"].get("succeeded") == 1
    build_s = (datetime.fromisoformat(job["status"]["completionTime"])
               - datetime.fromisoformat(job["status"]["startTime"])).total_seconds()
    assert cluster.get("persistentvolumeclaim", "fal-environments", namespace) is not None
    deployment = cluster.json("get", "deployment", "app", "-n", namespace)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][0] == f"/fal/envs/{env}/bin/python"
    assert pod["initContainers"][0]["name"] == "fal-sidecar"

    rid = http.post(f"{url}/fal/queue/submit/test", json={"q": 1}).json()["request_id"]
    got = wait_until(lambda: (lambda r: r if r.status_code == 200 else None)(
        http.get(f"{url}/fal/queue/{rid}/get")), 60, "the seed's queue result")
    assert got.json() == {"version": 1, "input": {"q": 1}}

    # --- a changed file, the same requirements: a new revision, no build ----------------
    app.write_text(SEED.format(version=2, keep_alive=300))
    t2 = time.monotonic()
    second = serve(cluster, app, namespace, wheelhouse)
    redeployed_in = time.monotonic() - t2
    rev2 = announced(second)[1]
    assert rev2 != rev1
    assert f"environment {env} is built already" in second.stderr, second.stderr
    assert "pip install" not in second.stderr
    assert len(build_jobs(cluster, namespace)) == 1, "no second build"
    wait_until(lambda: http.post(f"{url}/test", json={}).json().get("version") == 2, 120,
               "the new revision answering")
    new_code_in = time.monotonic() - t2
    ff = cluster.json("get", "falfunction", "app", "-n", namespace)
    assert [r["revision"] for r in ff["status"]["revisions"]] == [rev1, rev2]
    printed = cluster.kubectl("get", "falfunction", "app", "-n", namespace).stdout
    assert "REVISION" in printed and rev2 in printed, printed

    # --- the same file again: the same revision -----------------------------------------
    again = serve(cluster, app, namespace, wheelhouse)
    assert announced(again)[1] == rev2

    # --- a build that fails: the old revision keeps serving ------------------------------
    app.write_text(SEED.format(version=3, keep_alive=300).replace(
        '["flask"]', '["flask", "no-such-package-fal-test-xyz"]'))
    bad = serve(cluster, app, namespace, wheelhouse, check=False)
    assert bad.returncode != 0 and bad.stdout == "", bad.stdout
    assert "environment build failed" in bad.stderr and "no-such-package-fal-test-xyz" in bad.stderr, \
        bad.stderr[-3000:]
    assert f"revision {rev2} keeps serving" in bad.stderr
    ff = cluster.json("get", "falfunction", "app", "-n", namespace)
    assert ff["status"]["revision"] == rev2
    failed = condition(ff, "EnvironmentReady")
    assert (failed["status"], failed["reason"]) == ("False", "EnvironmentFailed")
    assert "no-such-package-fal-test-xyz" in failed["message"], failed["message"]
    assert condition(ff, "Ready")["status"] == "True"
    events = cluster.json("get", "events.events.k8s.io", "-n", namespace)["items"]
    assert any(e.get("reason") == "BuildFailed" and e.get("type") == "Warning" for e in events), \
        [e.get("reason") for e in events]
    r = http.post(f"{url}/test", json={"still": True})
    assert r.status_code == 200 and r.json()["version"] == 2, r.text

    print(f"FUNCTION-SERVE-CLUSTER first serve: build Job {build_s:.0f} s (start to completion), "
          f"the CLI returned after {served_in:.1f} s, first answer {first_answer:.1f} s after the "
          f"serve started; redeploy without a build: the CLI {redeployed_in:.1f} s, the new code "
          f"answering {new_code_in:.1f} s after the serve started")
    for proc in (controller, gateway):
        assert not RBAC_DENIAL.findall(proc.log()), proc.log()[-3000:]
    http.close()
