#!/usr/bin/env bash
# Builds the fuzz targets on stable Rust and runs each for SECONDS (default 60):
#   fuzz/run.sh [SECONDS] [TARGET...]
# libFuzzer with SanitizerCoverage (stable -C flags), debug assertions and
# overflow checks; no AddressSanitizer (nightly-only): the code under test is
# safe Rust, so the findings that matter are panics, hangs and memory blow-ups,
# which libFuzzer reports as crashes, timeouts and rss-limit hits. Exit status
# is non-zero on any finding; the input is saved under fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(device_payload edge_batch batch_payload log_record archive_segment)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# With an explicit --target the flags reach only the targets, not build scripts and proc macros.
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --bins -q --target "$triple"
bin="target/$triple/release"
for t in "${targets[@]}"; do
  mkdir -p "artifacts/$t"
  # New inputs go to a scratch corpus; the committed seeds (corpus/TARGET) stay as they are.
  work="target/corpus/$t"
  mkdir -p "$work"
  cp corpus/"$t"/* "$work"/
  echo "== fuzzing $t for ${secs}s"
  log="target/$t.log"
  status=0
  "$bin/$t" "$work" -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 \
    -max_len=65536 -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz/run.sh: $t found a problem (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
