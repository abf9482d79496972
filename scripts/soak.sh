#!/usr/bin/env bash
# The long soak (issue 17): scripts/soak.sh MINUTES [OUT_DIR]
# `fal-operator local` on a 3-master Redis Cluster, three functions scaling 0<->N, both
# official clients, a fault every few tens of seconds (tests/soak/soak.py says which).
# Release binaries; the report (markdown on stdout, report.json, rss.json, rss.png) in OUT_DIR.
# The short version runs in the test command (tests/soak/test_soak.py).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: scripts/soak.sh MINUTES [OUT_DIR]}
out=${2:-$(mktemp -d /tmp/fal-soak.XXXXXX)}
VENV=${FAL_TEST_VENV:-$PWD/.venv}
[ -x "$VENV/bin/python" ] || { echo "no test venv at $VENV: run scripts/test.sh once (it creates it)" >&2; exit 2; }
cargo build --release --locked -q -p fal-operator -p fal-sidecar
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$out"
echo "soak: $minutes min, output in $out"
exec "$VENV/bin/python" tests/soak/soak.py --seconds "$((minutes * 60))" --out "$out" --png "$out/rss.png" \
  --operator "$TARGET_DIR/release/fal-operator" --sidecar "$TARGET_DIR/release/fal-sidecar"
