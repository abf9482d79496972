#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. Rust unit and conformance tests of every crate (cargo nextest);
#   2. the operator's rendered objects validated by kubernetes-validate;
#   3. the runner's unit tests (tests/runner), the end-to-end suites (tests/e2e, tests/local: scale to zero,
#      function serve): the real binaries, the example app, a webhook
#      receiver, redis-server and the real fal clients (PyPI fal-client, npm
#      @fal-ai/client), all on loopback; tests/http-edge: the differential HTTP/1.1
#      corpus against nginx and (where installed) Go's net/http; and the short soak
#      (tests/soak: faults under mixed traffic on a Redis Cluster; scripts/soak.sh
#      MINUTES runs the long one).
# Installs what it needs (Python venv, npm packages, redis-server, nginx) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# --- system packages -------------------------------------------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# The reference server of tests/http-edge (in /usr/sbin, which a user's PATH may lack).
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # The package's own service is not wanted: tests start their own servers.
  for svc in redis-server nginx; do
    (command -v systemctl >/dev/null && $SUDO systemctl disable --now "$svc" 2>/dev/null) || true
  done
fi

# --- Python venv (fal-client, cryptography, kubernetes-validate, …) -----------------
VENV=${FAL_TEST_VENV:-$ROOT/.venv}
stamp="$VENV/.requirements.sha"
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== creating the test venv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi

# --- the npm @fal-ai/client, for the JS client test ----------------------------------
js_stamp=tests/js/node_modules/.lock.sha
js_want=$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$js_stamp" 2>/dev/null)" != "$js_want" ]; then
  echo "== installing the npm test client (tests/js)"
  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
  echo "$js_want" > "$js_stamp"
fi

# --- Rust ----------------------------------------------------------------------------
echo "== cargo fmt --check, cargo clippy -D warnings"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "NOTICE: cargo fmt (rustfmt) is not installed here: formatting NOT checked (rustup component add rustfmt)"
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "NOTICE: cargo clippy is not installed here: lints NOT checked (rustup component add clippy)"
fi

echo "== cargo build"
cargo build --workspace --bins --locked
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export FAL_SIDECAR_BIN="$TARGET_DIR/debug/fal-sidecar"
export FAL_OPERATOR_BIN="$TARGET_DIR/debug/fal-operator"

echo "== cargo nextest (unit, conformance, reconcile tests)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

# --- operator manifests ----------------------------------------------------------------
if [ -x scripts/test-operator.sh ]; then
  echo "== operator: rendered objects against the Kubernetes schema"
  scripts/test-operator.sh "$VENV/bin/python"
fi

# --- Helm chart and images ----------------------------------------------------------------
if [ -x scripts/test-chart.sh ]; then
  echo "== chart: helm lint/template against the Kubernetes schema; images (scripts/images.sh)"
  scripts/test-chart.sh "$VENV/bin/python"
fi

# --- end to end ----------------------------------------------------------------------------
echo "== end-to-end (real processes on loopback)"
# Generous per-test bound: CI machines are shared; the tests poll, they do not time.
export E2E_TEST_TIMEOUT=${E2E_TEST_TIMEOUT:-180}
"$VENV/bin/python" -m pytest tests/runner tests/e2e tests/local tests/http-edge tests/soak -q -p no:cacheprovider "$@"

# --- a real Kubernetes control plane ------------------------------------------------------
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and CoreDNS
# built from Go modules (cached; the first build takes minutes) and the test kubelet: the
# CRD's CEL rules, the operator as its ServiceAccount, FalFunction pods serving the
# queue, Services, cluster DNS and volumes as the Helm chart needs them.
echo "== Kubernetes control plane (scripts/cluster.sh + tests/cluster)"
tests/cluster/run.sh "$VENV/bin/python"
