#!/usr/bin/env bash
# End-to-end test of the Helm chart on a throwaway kind cluster.
#
#   scripts/kind-e2e.sh            # create cluster, install, test, delete cluster
#   KEEP_CLUSTER=1 scripts/kind-e2e.sh
#   FAL_IMAGE_PROFILE=debug scripts/kind-e2e.sh   # images from debug binaries (faster)
#
# Needs docker (for the cluster and the example app's image), kind and kubectl; helm
# comes from $HELM, the PATH, or scripts/test-chart.sh --install-helm (cached).
#   1. scripts/images.sh builds the fal-operator and fal-sidecar images without Docker;
#      `kind load image-archive` puts them on the node under the chart's default names.
#   2. helm install fal-serverless charts/fal-serverless -n fal-system --create-namespace
#      (bundled Redis on kind's local-path PVC), and wait for every rollout.
#   3. The seed app as a FalFunction scaled to zero (XS: kind has no GPU); a sync call
#      through the gateway wakes it; a queue submit/status/result goes through the
#      queue host; the function is Ready with one replica.
#   4. operator/tests/kind_e2e.rs with the chart's controller scaled to 0 (that test
#      runs its own controller in-process).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in docker kind kubectl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "kind-e2e: '$tool' not found; this test needs docker, kind and kubectl" >&2
        exit 2
    fi
done
HELM=${HELM:-$(command -v helm || scripts/test-chart.sh --install-helm)}

CLUSTER="${KIND_CLUSTER:-fal-e2e}"
CONTEXT="kind-${CLUSTER}"
NS=fal-system
RELEASE=fal-serverless
K=(kubectl --context "$CONTEXT")

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --wait 180s
fi
cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "kind-e2e: failed; state of the cluster:" >&2
        "${K[@]}" get pods -A -o wide >&2 || true
        "${K[@]}" -n "$NS" logs deploy/$RELEASE-operator --tail=50 >&2 || true
        "${K[@]}" -n "$NS" logs deploy/$RELEASE-gateway --tail=50 >&2 || true
    fi
    [[ -n "${PF_PID:-}" ]] && kill "$PF_PID" 2>/dev/null
    if [[ "${KEEP_CLUSTER:-0}" != "1" ]]; then
        kind delete cluster --name "$CLUSTER"
    fi
    exit $rc
}
trap cleanup EXIT

# --- images ----------------------------------------------------------------------------
scripts/images.sh
for image in dist/images/fal-operator.tar dist/images/fal-sidecar.tar; do
    kind load image-archive "$image" --name "$CLUSTER"
done
docker build -f examples/Dockerfile -t fal-seed-app:e2e examples
kind load docker-image fal-seed-app:e2e --name "$CLUSTER"

# --- the chart ---------------------------------------------------------------------------
"$HELM" lint --strict charts/fal-serverless
"$HELM" upgrade --install "$RELEASE" charts/fal-serverless -n "$NS" --create-namespace \
    --kube-context "$CONTEXT" --set gateway.replicas=1 --wait --timeout 5m
for workload in deploy/$RELEASE-operator deploy/$RELEASE-gateway statefulset/$RELEASE-redis; do
    "${K[@]}" -n "$NS" rollout status "$workload" --timeout=180s
done
"${K[@]}" wait --for condition=established --timeout=60s crd/falfunctions.fal.serverless.dev

# --- a function scaled to zero, woken through the gateway ----------------------------------
"${K[@]}" apply -f - <<'EOF'
apiVersion: fal.serverless.dev/v1alpha1
kind: FalFunction
metadata:
  name: seed-app
  namespace: default
spec:
  image: fal-seed-app:e2e
  exposedPort: 8080
  machineType: XS
  keepAlive: 120
  minReplicas: 0
  maxReplicas: 1
  maxConcurrency: 1
  readinessPath: /health
EOF

# An API key of the function's namespace (the function is private by default): only the
# secret's sha256 goes into the cluster.
"${K[@]}" wait --for condition=established --timeout=60s crd/falkeys.fal.serverless.dev
FAL_KEY_ID=$(python3 -c 'import uuid; print(uuid.uuid4())')
FAL_KEY_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
FAL_KEY_SHA=$(printf %s "$FAL_KEY_SECRET" | sha256sum | cut -d' ' -f1)
"${K[@]}" apply -f - <<EOF
apiVersion: fal.serverless.dev/v1alpha1
kind: FalKey
metadata: {name: kind-e2e, namespace: default}
spec: {keyId: "$FAL_KEY_ID", secretSha256: "$FAL_KEY_SHA"}
EOF
AUTH="Authorization: Key $FAL_KEY_ID:$FAL_KEY_SECRET"

"${K[@]}" -n "$NS" port-forward "svc/$RELEASE-gateway" 18080:80 18081:8081 >/dev/null 2>&1 &
PF_PID=$!
for _ in $(seq 60); do
    curl -fsS -o /dev/null "http://127.0.0.1:18081/.well-known/jwks.json" && break
    sleep 1
done

echo "kind-e2e: no key, 401"
[[ "$(curl -sS -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:18080/default/seed-app/test -d '{}')" == 401 ]]

echo "kind-e2e: sync call through the gateway (wakes the function from zero)"
out=$(curl -fsS --max-time 300 -H "$AUTH" -X POST http://127.0.0.1:18080/default/seed-app/test \
    -H 'content-type: application/json' -d '{"prompt": "kind"}')
echo "$out"
grep -q '"prompt": *"kind"' <<<"$out"

echo "kind-e2e: queue submit, status, result through the queue host"
submit=$(curl -fsS -H "$AUTH" -X POST http://127.0.0.1:18081/default/seed-app/test -d '{"n": 1}')
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])' <<<"$submit")
for _ in $(seq 120); do
    status=$(curl -fsS -H "$AUTH" "http://127.0.0.1:18081/default/seed-app/requests/$id/status")
    grep -q COMPLETED <<<"$status" && break
    sleep 1
done
grep -q COMPLETED <<<"$status"
curl -fsS -H "$AUTH" "http://127.0.0.1:18081/default/seed-app/requests/$id" | grep -q '"n": *1'

"${K[@]}" wait --for=condition=Ready falfunction/seed-app -n default --timeout=60s
[[ "$("${K[@]}" -n default get deploy seed-app -o jsonpath='{.status.readyReplicas}')" == 1 ]]
kill "$PF_PID"; PF_PID=

# --- the controller test of the operator crate -----------------------------------------------
# It runs its own controller; the chart's steps aside meanwhile.
"${K[@]}" delete falfunction seed-app -n default --wait
"${K[@]}" -n "$NS" scale deploy/$RELEASE-operator --replicas=0
"${K[@]}" -n "$NS" rollout status deploy/$RELEASE-operator --timeout=60s
kubectl config use-context "$CONTEXT" >/dev/null
FAL_E2E_APP_IMAGE=fal-seed-app:e2e \
FAL_E2E_SIDECAR_IMAGE="$("${K[@]}" -n "$NS" get deploy/$RELEASE-operator \
    -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="FAL_SIDECAR_IMAGE")].value}')" \
FAL_E2E_EXPECT_READY=1 \
    cargo test -p fal-operator --test kind_e2e -- --ignored --nocapture
"${K[@]}" -n "$NS" scale deploy/$RELEASE-operator --replicas=1
echo "kind-e2e: ok"
