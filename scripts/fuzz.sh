#!/usr/bin/env bash
# The long fuzzing campaign of the parsers (issue 10): request routing of the three
# protocol generations and the gateway, the X-Fal-* submit options, credentials (Authorization, tokens), the webhook URL
# guard. `cargo test` runs the same properties with 1024 cases each; this runs more.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 60; env FUZZ_SECONDS likewise)
#
# 1. The proptest properties (sidecar/tests/fuzz_*.rs, operator/tests/fuzz_*.rs) with
#    PROPTEST_CASES (default 200000; a few minutes in the test profile).
# 2. With nightly and cargo-fuzz (`cargo install cargo-fuzz`), the libFuzzer targets of
#    fuzz/ (routing, options, webhook_url, authorization), SECONDS_PER_TARGET each, corpus kept in
#    fuzz/corpus/. Without them this step is skipped with a notice.
# A crash leaves its input in fuzz/artifacts/<target>/: reproduce it with
# `cargo +nightly fuzz run <target> <file>`, then add it as a fixed-input test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-${FUZZ_SECONDS:-60}}
export PROPTEST_CASES=${PROPTEST_CASES:-200000}

echo "== proptest properties, $PROPTEST_CASES cases each"
cargo test --locked -p fal-sidecar --test fuzz_routing --test fuzz_options --test fuzz_ssrf --test fuzz_auth
cargo test --locked -p fal-operator --test fuzz_gateway_routing

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "NOTICE: no nightly toolchain: libFuzzer targets NOT run (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "NOTICE: cargo-fuzz is not installed: libFuzzer targets NOT run (cargo install cargo-fuzz)"
  exit 0
fi
cd fuzz
# fuzz/ is its own workspace with its own target directory.
unset CARGO_TARGET_DIR
for target in $(cargo +nightly fuzz list); do
  echo "== cargo fuzz run $target for ${SECONDS_PER_TARGET}s"
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=512 -print_final_stats=1
done
echo "== fuzzing done: no crash"
