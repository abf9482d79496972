#!/usr/bin/env bash
# Scale-to-zero benchmarks (BENCHMARKS.md): cold start and wake latency in local mode,
# warm sync calls and queue submits through the gateway against the same paths
# straight to a replica's sidecar, and the idle RSS of a gateway knowing 1,000
# functions. Baselines run in the same invocation; see scripts/bench_gateway.py.
# Usage: scripts/bench-gateway.sh [--duration S] [--conns N] [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for t in nginx wrk redis-server; do command -v $t >/dev/null || need+=("${t/redis-server/redis-server}"); done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "== building release binaries"
cargo build --release --locked --bins 2>&1 | tail -1
DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
exec python3 scripts/bench_gateway.py --operator "$DIR/fal-operator" --sidecar "$DIR/fal-sidecar" "$@"
