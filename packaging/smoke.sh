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
AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke "${run[@]}" "$bin" validate --offline -c "$work/ha-edge.toml"

# a real run opens (creates) the journal; nothing to send, and the endpoint is never reached
sed -i 's|^endpoint = .*|endpoint = "http://127.0.0.1:9"|; s|^max_retries = .*|max_retries = 0|; s|^path_style = .*|path_style = true|' "$work/ha-edge.toml"
AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke "${run[@]}" "$bin" run -c "$work/ha-edge.toml" --once 2>"$work/run.log" \
  || { cat "$work/run.log"; exit 1; }
"${run[@]}" "$bin" status -c "$work/ha-edge.toml" --json >"$work/status.json"
grep -q '"pending": 0' "$work/status.json" || { cat "$work/status.json"; exit 1; }
# A reader that stops early must not crash the command.
"${run[@]}" "$bin" status -c "$work/ha-edge.toml" | head -n 1 >/dev/null
AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke "${run[@]}" "$bin" validate --offline -c "$work/ha-edge.toml" >/dev/null   # also checks the journal integrity

# The QUIC relay path, both ends this binary: certificates from openssl, a relay landing in a
# directory, one file sent by an agent with mutual TLS.
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
pki="$work/pki"
mkdir -p "$pki" "$work/qin"
(
  cd "$pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj "/CN=smoke CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign 2>/dev/null
  for n in relay:relay.smoke agent:agent.smoke; do
    name="${n%%:*}"
    dns="${n#*:}"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$name.key" \
      -out "$name.csr" -subj "/CN=$dns" 2>/dev/null
    echo "subjectAltName=DNS:$dns" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$name.pem" \
      -days 2 -extfile "$name.ext" 2>/dev/null
  done
)
port=$((20000 + RANDOM % 20000))
printf '%s\n' "[relay]" "listen = \"127.0.0.1:$port\"" "cert_file = \"$pki/relay.pem\"" \
  "key_file = \"$pki/relay.key\"" "client_ca_file = \"$pki/ca.pem\"" \
  "state_dir = \"$work/relay-state\"" "" "[[agent]]" "identity = \"agent.smoke\"" \
  "prefix = \"smoke/\"" "" "[store]" "type = \"dir\"" "path = \"$work/landed\"" >"$work/relay.toml"
"${run[@]}" "$bin" relay -c "$work/relay.toml" --check
"${run[@]}" "$bin" relay -c "$work/relay.toml" 2>"$work/relay.log" &
relay_pid=$!
printf '%s\n' "[agent]" "journal = \"$work/qstate/journal.db\"" "" "[[source]]" "name = \"smoke\"" \
  "type = \"fs\"" "path = \"$work/qin\"" "settle = \"0s\"" "" "[destination]" "type = \"quic\"" \
  "relay = \"127.0.0.1:$port\"" "server_name = \"relay.smoke\"" "ca_file = \"$pki/ca.pem\"" \
  "cert_file = \"$pki/agent.pem\"" "key_file = \"$pki/agent.key\"" "prefix = \"smoke/\"" \
  >"$work/quic.toml"
head -c 3000000 /dev/urandom >"$work/qin/sample.dcm"
sleep 2
if ! "${run[@]}" "$bin" run -c "$work/quic.toml" --once 2>"$work/quic.log"; then
  cat "$work/quic.log" "$work/relay.log"
  kill "$relay_pid"
  exit 1
fi
kill "$relay_pid"
wait "$relay_pid" 2>/dev/null || true
cmp "$work/qin/sample.dcm" "$work/landed/smoke/sample.dcm" || { cat "$work/quic.log" "$work/relay.log"; exit 1; }
echo "$t: QUIC relay round trip passed"
echo "$t: smoke test passed"
