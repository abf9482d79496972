#!/usr/bin/env bash
# End-to-end test of fal-operator on a throwaway kind cluster.
#
#   scripts/kind-e2e.sh            # create cluster, run operator/tests/kind_e2e.rs, delete cluster
#   KEEP_CLUSTER=1 scripts/kind-e2e.sh
#
# Needs docker, kind and kubectl (and helm once charts/fal-serverless exists, to lint
# it). The controller runs inside the test process against the kind context, so no
# operator image is needed. When sidecar/Dockerfile exists the sidecar image is built
# too and the test also waits for the function's pods to become Ready.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in docker kind kubectl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "kind-e2e: '$tool' not found; this test needs docker, kind and kubectl" >&2
        exit 2
    fi
done

CLUSTER="${KIND_CLUSTER:-fal-e2e}"
CONTEXT="kind-${CLUSTER}"

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --wait 180s
fi
if [[ "${KEEP_CLUSTER:-0}" != "1" ]]; then
    trap 'kind delete cluster --name "$CLUSTER"' EXIT
fi

if [[ -d charts/fal-serverless ]] && command -v helm >/dev/null 2>&1; then
    helm lint charts/fal-serverless
fi

kubectl --context "$CONTEXT" apply -f crds/falfunctions.yaml
kubectl --context "$CONTEXT" wait --for condition=established --timeout=60s \
    crd/falfunctions.fal.serverless.dev

docker build -f examples/Dockerfile -t fal-seed-app:e2e examples
kind load docker-image fal-seed-app:e2e --name "$CLUSTER"
export FAL_E2E_APP_IMAGE=fal-seed-app:e2e

if [[ -f sidecar/Dockerfile ]]; then
    docker build -f sidecar/Dockerfile -t fal-sidecar:e2e .
    kind load docker-image fal-sidecar:e2e --name "$CLUSTER"
    export FAL_E2E_SIDECAR_IMAGE=fal-sidecar:e2e FAL_E2E_EXPECT_READY=1
else
    echo "kind-e2e: no sidecar/Dockerfile; checking objects and status, not pod readiness" >&2
fi

kubectl config use-context "$CONTEXT" >/dev/null
cargo test -p fal-operator --test kind_e2e -- --ignored --nocapture
