#!/usr/bin/env bash
# Coverage-guided fuzzing of kiln serve's parsers (DHCP, TFTP, HTTP Range) and of the YAML/JSON
# pre-check and name checks for project input (yaml_limits) and of the template checks (template) for a bounded time,
# on stable Rust: libFuzzer (the libfuzzer-sys crate) driven by LLVM's sanitizer-coverage
# instrumentation, switched on by RUSTFLAGS — what `cargo fuzz` does, without its nightly-only
# address sanitizer (kiln has no unsafe code in these parsers; a panic is the crash libFuzzer
# catches). Debug assertions stay off, as in kiln's release binary.
#
#   fuzz/run.sh [seconds per target]        (default 30; test.sh runs it after the tests)
#
# libFuzzer's random seed is fixed (KILN_FUZZ_SEED, default 1) so that a run from the same
# corpus explores the same inputs: a CI run does not fail by luck of the draw. KILN_FUZZ_SEED=0
# lets libFuzzer pick one (exploring new ground; what it finds goes into fuzz/seeds/).
#
# Starts from the committed seeds (fuzz/seeds/<target>, a merged corpus of earlier runs) and
# keeps what it finds in target/fuzz-corpus/<target>; a crash leaves its input in
# target/fuzz-artifacts/ and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
seed=${KILN_FUZZ_SEED:-1}
if ! command -v c++ >/dev/null; then
  echo "SKIP: fuzz: no C++ compiler to build libFuzzer (apt-get install g++)"
  exit 0
fi
host=$(rustc -vV | sed -n 's/^host: //p')
root=$(cd .. && pwd)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions=off"
# --target keeps RUSTFLAGS off the build scripts (they are not linked with libFuzzer).
cargo build --release --locked --quiet --target "$host" --target-dir "$root/target/fuzz" --bins
mkdir -p "$root/target/fuzz-artifacts"
for t in dhcp tftp http_range yaml_limits template; do
  corpus="$root/target/fuzz-corpus/$t"
  mkdir -p "$corpus"
  echo "fuzz: $t for ${secs}s"
  log="$root/target/fuzz-$t.log"
  rc=0
  "$root/target/fuzz/$host/release/$t" -max_total_time="$secs" -rss_limit_mb=2048 -seed="$seed" \
    -print_final_stats=1 -artifact_prefix="$root/target/fuzz-artifacts/$t-" \
    "$corpus" "seeds/$t" >"$log" 2>&1 || rc=$?
  grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done [0-9]+ runs)' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t failed (exit $rc); the input is in target/fuzz-artifacts/" >&2
    exit 1
  fi
done
echo "fuzz: no crash"
