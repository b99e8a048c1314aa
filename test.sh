#!/usr/bin/env bash
# Runs every test (fast and slow) and lists the ones that skipped for a missing capability.
set -uo pipefail
cd "$(dirname "$0")"
mkdir -p target
cargo test --release --locked -- --nocapture 2>&1 | tee target/test.log
status=${PIPESTATUS[0]}
skips=$(grep -c '^SKIP: ' target/test.log || true)
echo "== tests finished (exit $status); skipped: $skips"
grep '^SKIP: ' target/test.log | sort -u || true
exit "$status"
