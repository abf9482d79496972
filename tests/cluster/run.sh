#!/usr/bin/env bash
# The tests against a real control plane (scripts/test.sh calls this last):
#   tests/cluster/run.sh PYTHON [pytest args…]
# Builds the control plane once (cached, see scripts/cluster.sh), starts it unless it
# is already up, runs tests/cluster with PYTHON, and stops what it started, also on
# failure or Ctrl-C. Prints how long each step took.
# FAL_SKIP_CLUSTER_TESTS=1 skips them (e.g. on a machine without root).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-python3}
shift || true
if [ -n "${FAL_SKIP_CLUSTER_TESTS:-}" ]; then
  echo "cluster tests: skipped (FAL_SKIP_CLUSTER_TESTS is set)"
  exit 0
fi
t0=$SECONDS
scripts/cluster.sh build
echo "cluster tests: binaries ready in $((SECONDS - t0)) s"
if ! scripts/cluster.sh status >/dev/null 2>&1; then
  trap 'scripts/cluster.sh down' EXIT
  t1=$SECONDS
  scripts/cluster.sh up
  echo "cluster tests: control plane + test kubelet up in $((SECONDS - t1)) s"
fi
t2=$SECONDS
"$PY" -m pytest tests/cluster -q -p no:cacheprovider "$@"
echo "cluster tests: suite ran in $((SECONDS - t2)) s ($((SECONDS - t0)) s with build and start)"
