"""The chart's RBAC grants exactly the API calls of the operator and the gateway.

PERMISSIONS below is the table of those calls with the reason for each; the rendered
rules must equal it (nothing missing, nothing extra). The Kubernetes kinds the Rust
code builds an `Api` for must all be covered, and none of them may be a Secret.
deploy/rbac.yaml and deploy/rbac-gateway.yaml are generated from the chart (for
installs without helm) and must match it; FAL_UPDATE_DEPLOY=1 rewrites them.
"""

import os
import re

import pytest
import yaml

from conftest import NAMESPACE, ROOT, VARIANTS, by_kind, one

# (service account, scope, apiGroup, resource, verb) → why the code needs it.
CONTROLLER = "fal-serverless-operator"
GATEWAY = "fal-serverless-gateway"
PERMISSIONS = {
    (CONTROLLER, "cluster", "fal.serverless.dev", "falfunctions", "get"): "reconcile reads the function",
    (CONTROLLER, "cluster", "fal.serverless.dev", "falfunctions", "list"): "Controller::new watch, initial list",
    (CONTROLLER, "cluster", "fal.serverless.dev", "falfunctions", "watch"): "Controller::new watch",
    (CONTROLLER, "cluster", "fal.serverless.dev", "falfunctions/status", "get"): "status subresource read",
    (CONTROLLER, "cluster", "fal.serverless.dev", "falfunctions/status", "patch"): "server-side apply of status",
    (CONTROLLER, "cluster", "apps", "deployments", "get"): "owned Deployment read",
    (CONTROLLER, "cluster", "apps", "deployments", "list"): ".owns(Deployment) watch, initial list",
    (CONTROLLER, "cluster", "apps", "deployments", "watch"): ".owns(Deployment) watch",
    (CONTROLLER, "cluster", "apps", "deployments", "create"): "server-side apply creates",
    (CONTROLLER, "cluster", "apps", "deployments", "patch"): "server-side apply updates",
    (CONTROLLER, "cluster", "apps", "deployments/scale", "patch"): "autoscaler: patch_scale",
    (CONTROLLER, "cluster", "", "services", "get"): "owned Service read",
    (CONTROLLER, "cluster", "", "services", "list"): ".owns(Service) watch, initial list",
    (CONTROLLER, "cluster", "", "services", "watch"): ".owns(Service) watch",
    (CONTROLLER, "cluster", "", "services", "create"): "server-side apply creates",
    (CONTROLLER, "cluster", "", "services", "patch"): "server-side apply updates",
    (CONTROLLER, "cluster", "networking.k8s.io", "networkpolicies", "get"): "owned NetworkPolicy read",
    (CONTROLLER, "cluster", "networking.k8s.io", "networkpolicies", "list"): ".owns(NetworkPolicy) watch, initial list",
    (CONTROLLER, "cluster", "networking.k8s.io", "networkpolicies", "watch"): ".owns(NetworkPolicy) watch",
    (CONTROLLER, "cluster", "networking.k8s.io", "networkpolicies", "create"): "server-side apply creates",
    (CONTROLLER, "cluster", "networking.k8s.io", "networkpolicies", "patch"): "server-side apply updates",
    (CONTROLLER, "cluster", "networking.k8s.io", "networkpolicies", "delete"): "--network-policy=false removes the one a function controls",
    (CONTROLLER, "cluster", "", "pods", "list"): "autoscaler: a function's replicas (no watch)",
    (CONTROLLER, "cluster", "", "pods", "patch"): "pod-deletion-cost on busy replicas",
    (CONTROLLER, "cluster", "batch", "jobs", "get"): "a served file's build Job of a revision",
    (CONTROLLER, "cluster", "batch", "jobs", "list"): ".owns(Job) watch, initial list; old revisions' Jobs",
    (CONTROLLER, "cluster", "batch", "jobs", "watch"): ".owns(Job) watch: a finished build rolls the pods",
    (CONTROLLER, "cluster", "batch", "jobs", "create"): "the build Job of a revision whose environment is missing",
    (CONTROLLER, "cluster", "batch", "jobs", "delete"): "build Jobs of revisions past the history",
    (CONTROLLER, "cluster", "", "configmaps", "get"): "a revision's source exists before it is built",
    (CONTROLLER, "cluster", "", "configmaps", "list"): "sources of a function's revisions (metadata)",
    (CONTROLLER, "cluster", "", "configmaps", "delete"): "sources of revisions past the history",
    (CONTROLLER, "cluster", "", "persistentvolumeclaims", "get"): "the namespace's environments claim",
    (CONTROLLER, "cluster", "", "persistentvolumeclaims", "create"): "the environments claim, made when missing",
    (CONTROLLER, "cluster", "events.k8s.io", "events", "create"): "Recorder: Normal/Warning events",
    (CONTROLLER, "cluster", "events.k8s.io", "events", "patch"): "Recorder: event series",
    (CONTROLLER, "namespace", "coordination.k8s.io", "leases", "create"): "leader election: first leader",
    (CONTROLLER, "namespace", "coordination.k8s.io", "leases", "get"): "leader election: read the Lease",
    (CONTROLLER, "namespace", "coordination.k8s.io", "leases", "update"): "leader election: renew/take over",
    (GATEWAY, "cluster", "fal.serverless.dev", "falfunctions", "list"): "route table watcher, initial list",
    (GATEWAY, "cluster", "fal.serverless.dev", "falfunctions", "watch"): "route table watcher",
    (GATEWAY, "cluster", "fal.serverless.dev", "falkeys", "list"): "API key watcher, initial list",
    (GATEWAY, "cluster", "fal.serverless.dev", "falkeys", "watch"): "API key watcher (only secret hashes)",
    (GATEWAY, "cluster", "discovery.k8s.io", "endpointslices", "list"): "ready pods, initial list",
    (GATEWAY, "cluster", "discovery.k8s.io", "endpointslices", "watch"): "ready pods of a function",
}

# Rust type → (apiGroup, resource) for the kinds the code may build an Api<K> for.
KINDS = {
    "FalFunction": ("fal.serverless.dev", "falfunctions"),
    "FalKey": ("fal.serverless.dev", "falkeys"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "Deployment": ("apps", "deployments"),
    "Service": ("", "services"),
    "Pod": ("", "pods"),
    "Lease": ("coordination.k8s.io", "leases"),
    "EndpointSlice": ("discovery.k8s.io", "endpointslices"),
    "Event": ("events.k8s.io", "events"),
    "Secret": ("", "secrets"),
    "ConfigMap": ("", "configmaps"),
    "Node": ("", "nodes"),
    "Namespace": ("", "namespaces"),
    "ReplicaSet": ("apps", "replicasets"),
    "Endpoints": ("", "endpoints"),
    "Job": ("batch", "jobs"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
}


def grants(objs):
    """(service account, scope, group, resource, verb) for every binding's rules."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("ClusterRole", "Role")}
    out = set()
    for b in objs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], ns, ref["name"])]
        scope = "cluster" if b["kind"] == "ClusterRoleBinding" else "namespace"
        for subject in b["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            out.add((subject["name"], scope, group, resource, verb))
    return out


@pytest.mark.parametrize("variant", ["defaults", "ha"])
def test_rbac_is_exactly_the_calls_the_code_makes(template, variant):
    objs = template(VARIANTS[variant])
    granted = grants(objs)
    assert granted - PERMISSIONS.keys() == set(), "granted but not in the table of calls"
    assert PERMISSIONS.keys() - granted == set(), "a call the code makes is not granted"


# The deletes: with --network-policy=false the controller removes the policy a function
# controls (garbage collection would keep it as long as the function lives), and the
# sources and build Jobs of a served file's revisions past its history.
DELETABLE = {"networkpolicies", "configmaps", "jobs"}


def test_no_wildcards_no_secrets_no_deletes(template):
    for obj in by_kind(template(), "ClusterRole") + by_kind(template(), "Role"):
        for rule in obj["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            assert "secrets" not in rule["resources"], "no Secret is read through the API"
            assert "deletecollection" not in rule["verbs"]
            if "delete" in rule["verbs"]:
                assert set(rule["resources"]) <= DELETABLE, \
                    "owner references garbage-collect; nothing else is deleted"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_gateway_reads_falkeys_but_never_secrets(template):
    gateway = {(g, r, v) for (sa, _, g, r, v) in grants(template()) if sa == GATEWAY}
    assert ("fal.serverless.dev", "falkeys", "watch") in gateway
    assert not {v for (_, r, v) in gateway if r == "falkeys"} - {"list", "watch"}, \
        "the gateway only reads keys"
    assert not [g for g in gateway if g[1] in ("secrets", "falkeys/status")], gateway


def test_lease_rights_are_namespaced_and_named(template):
    objs = template()
    for role in by_kind(objs, "ClusterRole"):
        assert all("leases" not in r["resources"] for r in role["rules"]), \
            "Lease rights belong to the release namespace only"
    role = one(objs, "Role")
    for rule in role["rules"]:
        if set(rule["verbs"]) - {"create"}:
            # create cannot be limited by name; everything else is on our Lease only.
            assert rule["resourceNames"] == ["fal-serverless-operator"]


def test_each_workload_runs_as_its_own_service_account(template):
    objs = template()
    sa = {d["metadata"]["name"]: d["spec"]["template"]["spec"].get("serviceAccountName")
          for d in by_kind(objs, "Deployment")}
    assert sa == {CONTROLLER: CONTROLLER, GATEWAY: GATEWAY}
    (redis,) = by_kind(objs, "StatefulSet")
    assert redis["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_every_kind_the_code_calls_is_granted():
    """Scan operator/src for `Api<K>` / `Api::<K>`: each kind the code talks to has a
    rule, and none is a Secret (the chart hands secrets in as env and volumes)."""
    source = "".join(p.read_text() for p in (ROOT / "operator" / "src").rglob("*.rs"))
    used = set(re.findall(r"\bApi\s*(?:::)?\s*<\s*([A-Z][A-Za-z]+)\s*>", source))
    assert "FalFunction" in used and "Deployment" in used, f"the scan found {used}"
    if "Recorder::new" in source:
        used.add("Event")
    unknown = used - KINDS.keys()
    assert not unknown, f"add {unknown} to KINDS and PERMISSIONS (and the chart's RBAC)"
    granted = {(group, resource) for (_, _, group, resource, _) in PERMISSIONS}
    missing = {k for k in used if KINDS[k] not in granted}
    assert not missing, f"the operator uses Api<{missing}> but the chart grants nothing on it"


# --- deploy/: the same RBAC for installs without helm --------------------------------------

DEPLOY = {
    "deploy/rbac.yaml": ("templates/rbac-operator.yaml", "fal-operator controller"),
    "deploy/rbac-gateway.yaml": ("templates/rbac-gateway.yaml", "fal-operator gateway"),
}


def generated(template, show_only, what):
    objs = template({"fullnameOverride": "fal"}, "--show-only", show_only)
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        # Not installed by helm: no helm labels.
        for key in ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version"):
            labels.pop(key, None)
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": NAMESPACE,
                              "labels": {"app.kubernetes.io/part-of": "fal-serverless"}}}
    if show_only.endswith("rbac-operator.yaml"):
        objs = [namespace] + objs
    header = (f"# RBAC of {what}, generated from charts/fal-serverless/{show_only}\n"
              "# (helm template --set fullnameOverride=fal -n fal-system, helm labels dropped).\n"
              "# Do not edit: FAL_UPDATE_DEPLOY=1 scripts/test-chart.sh PYTHON regenerates it.\n"
              "# The reasons for each rule are in the chart template.\n")
    return header + "---\n".join(yaml.safe_dump(o, sort_keys=False) for o in objs)


@pytest.mark.parametrize("path", sorted(DEPLOY))
def test_deploy_rbac_is_generated_from_the_chart(template, path):
    show_only, what = DEPLOY[path]
    text = generated(template, show_only, what)
    target = ROOT / path
    if os.environ.get("FAL_UPDATE_DEPLOY") == "1":
        target.write_text(text)
    assert target.read_text() == text, \
        f"{path} is stale: FAL_UPDATE_DEPLOY=1 scripts/test-chart.sh PYTHON rewrites it"
