#!/usr/bin/env bash
# Builds the decoder fuzz target with libFuzzer's coverage instrumentation on a stable
# toolchain (what `cargo fuzz build` does, minus the nightly-only sanitizer flags) and runs it
# for a bounded time. Usage: proto/fuzz/run.sh [seconds]   (default 60)
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# With an explicit --target, RUSTFLAGS reach the fuzzed code but not the build scripts.
host="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bin decode --target "$host"
mkdir -p corpus/decode
exec "target/$host/release/decode" corpus/decode -max_total_time="$secs" -max_len=65536 -rss_limit_mb=512
