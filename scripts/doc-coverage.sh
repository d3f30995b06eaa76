#!/usr/bin/env bash
# Share of agent/src lines that are doc comments (/// and //!), the measure of the renovation
# issue (target: at least 12 %).
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(find agent/src -name '*.rs')
total=$(cat $files | wc -l)
docs=$(cat $files | grep -cE '^\s*(///|//!)')
awk -v d="$docs" -v t="$total" 'BEGIN { printf "doc comments: %d of %d lines (%.1f %%)\n", d, t, 100 * d / t }'
