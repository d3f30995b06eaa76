#!/usr/bin/env bash
# Smoke test of a built binary, natively or under qemu-user for the ARM targets:
# static linking, --version, validate on the example config, and a journal opened by a real run.
#
#   packaging/smoke.sh TARGET [BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
t="$1"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
bin="$(realpath "${2:-dist/ha-edge-$version-$t}")"
case "$t" in
  x86_64-*) run=() ;;
  aarch64-*) command -v qemu-aarch64 >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user; }; run=(qemu-aarch64) ;;
  armv7-*) command -v qemu-arm >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user; }; run=(qemu-arm) ;;
esac

desc="$(file -b "$bin")"
echo "$t: $desc"
case "$desc" in
  *"statically linked"*|*"static-pie linked"*) ;;
  *) echo "FAIL: $bin is not statically linked" >&2; exit 1 ;;
esac
if ldd "$bin" 2>&1 | grep -q "=>"; then echo "FAIL: ldd finds dynamic dependencies" >&2; exit 1; fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in"
"${run[@]}" "$bin" --version | grep -q "ha-edge $version"

# validate the shipped example, pointed at a directory that exists here
sed "s|/srv/exports/fhir|$work/in|; s|/var/lib/ha-edge/journal.db|$work/state/journal.db|" \
  examples/ha-edge.toml >"$work/ha-edge.toml"
AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke "${run[@]}" "$bin" validate -c "$work/ha-edge.toml"

# a real run opens (creates) the journal; nothing to send, and the endpoint is never reached
sed -i 's|^endpoint = .*|endpoint = "http://127.0.0.1:9"|; s|^max_retries = .*|max_retries = 0|; s|^path_style = .*|path_style = true|' "$work/ha-edge.toml"
AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke "${run[@]}" "$bin" run -c "$work/ha-edge.toml" --once 2>"$work/run.log" \
  || { cat "$work/run.log"; exit 1; }
"${run[@]}" "$bin" status -c "$work/ha-edge.toml" --json >"$work/status.json"
grep -q '"pending": 0' "$work/status.json" || { cat "$work/status.json"; exit 1; }
# A reader that stops early must not crash the command.
"${run[@]}" "$bin" status -c "$work/ha-edge.toml" | head -n 1 >/dev/null
AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke "${run[@]}" "$bin" validate -c "$work/ha-edge.toml" >/dev/null   # also checks the journal integrity
echo "$t: smoke test passed"
