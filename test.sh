#!/usr/bin/env bash
# Runs every test (fast, and the slow suites behind the `slow` feature), then a bounded fuzz run, and lists the ones that skipped for
# a missing capability.
set -uo pipefail
cd "$(dirname "$0")"
mkdir -p target
cargo test --release --locked --no-fail-fast --features slow -- --nocapture 2>&1 | tee target/test.log
status=${PIPESTATUS[0]}
# Coverage-guided fuzzing of the PXE server's parsers, bounded (FUZZ_SECONDS per target).
if [ "$status" -eq 0 ]; then
  fuzz/run.sh "${FUZZ_SECONDS:-15}" 2>&1 | tee -a target/test.log
  status=${PIPESTATUS[0]}
fi
skips=$(grep -c '^SKIP: ' target/test.log || true)
echo "== tests finished (exit $status); skipped: $skips"
grep '^SKIP: ' target/test.log | sort -u || true
exit "$status"
