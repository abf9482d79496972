#!/usr/bin/env bash
# API-key benchmarks (BENCHMARKS.md): gateway throughput and CPU with a key on every
# request and with a Redis-counted rate limit, against auth off in the same run; RSS
# with 10,000 FalKeys. See scripts/bench_auth.py.
# Usage: scripts/bench-auth.sh [--duration S] [--conns N] [--rounds N] [--keys N]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for t in nginx wrk redis-server; do command -v $t >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "== building release binaries"
cargo build --release --locked --bins 2>&1 | tail -1
DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
exec python3 scripts/bench_auth.py --operator "$DIR/fal-operator" --sidecar "$DIR/fal-sidecar" "$@"
