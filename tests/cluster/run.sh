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
# The runner image's python in the test kubelet: the test's, which makes venvs.
export FAL_RUNNER_PYTHON=${FAL_RUNNER_PYTHON:-$PY}
scripts/cluster.sh build
echo "cluster tests: binaries ready in $((SECONDS - t0)) s"
if ! scripts/cluster.sh status >/dev/null 2>&1; then
  if [ -z "${FAL_CLUSTER_PORT:-}${FAL_CLUSTER_NET:-}" ]; then
    # Another cluster on this machine (a developer's, another checkout's CI run) may
    # hold the default ports or pod network: take the first free slot.
    for n in $(seq 0 20); do
      port=$((16443 + 10 * n)) busy=0
      for p in $(seq "$port" $((port + 4))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && busy=1
      done
      pgrep -f -- "--bridge falk$n( |\$)" >/dev/null && busy=1
      if [ $busy = 0 ]; then
        export FAL_CLUSTER_PORT=$port FAL_CLUSTER_NET=$n
        break
      fi
    done
  fi
  trap 'scripts/cluster.sh down' EXIT
  t1=$SECONDS
  scripts/cluster.sh up
  echo "cluster tests: control plane + test kubelet up in $((SECONDS - t1)) s"
fi
t2=$SECONDS
"$PY" -m pytest tests/cluster -q -p no:cacheprovider "$@"
echo "cluster tests: suite ran in $((SECONDS - t2)) s ($((SECONDS - t0)) s with build and start)"
