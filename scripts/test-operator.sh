#!/usr/bin/env bash
# Offline validation tests of fal-operator (tests/operator): rendered objects against
# the Kubernetes schema (kubernetes-validate, strict), examples against the CRD schema.
#
#   scripts/test-operator.sh .venv/bin/python
#
# Expects target/debug/fal-operator to be built (or FAL_OPERATOR_BIN to point at one).
set -euo pipefail

PYTHON="${1:?usage: scripts/test-operator.sh PYTHON (e.g. .venv/bin/python)}"
cd "$(dirname "$0")/.."

export FAL_OPERATOR_BIN="${FAL_OPERATOR_BIN:-target/debug/fal-operator}"
if [[ ! -x "$FAL_OPERATOR_BIN" ]]; then
    echo "test-operator: $FAL_OPERATOR_BIN is missing; run 'cargo build -p fal-operator' first" >&2
    exit 1
fi

exec "$PYTHON" -m pytest -q -p no:cacheprovider tests/operator
