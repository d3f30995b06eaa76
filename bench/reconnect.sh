#!/usr/bin/env bash
# How long the agent takes to reconnect to the QUIC relay over an emulated link: the first
# connection (a full TLS handshake, then the protocol's hello: two round trips) and each one
# after a cut (the TLS session resumed, the hello in 0-RTT: one round trip). The agent runs as a
# daemon in netlab's `onprem` namespace, the relay (landing in a directory) in `cloud`; each
# round delivers one file, cuts the link (blackhole) for 8 s, and restores it. Prints the
# agent's `setup_ms` per connection (from its first packet to the relay's answer to the hello).
# Root only.
#
#   NETLAB=path/to/netlab.sh bench/reconnect.sh [--rtt 40] [--cuts 3]
# Builds the static release binary first (HA_EDGE_BIN=path measures that binary instead);
# scratch space in /var/tmp/ha-edge-reconnect.
set -euo pipefail
cd "$(dirname "$0")/.."
rtt=40 cuts=3
while [ $# -gt 0 ]; do
  case "$1" in
    --rtt) rtt="$2"; shift 2 ;;
    --cuts) cuts="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
netlab="${NETLAB:?set NETLAB to the WAN emulator (netlab.sh)}"
command -v nft >/dev/null || { apt-get update -qq && apt-get install -y -qq nftables; }
if [ -n "${HA_EDGE_BIN:-}" ]; then
  bin="$(realpath "$HA_EDGE_BIN")"
else
  packaging/build.sh --no-package x86_64-unknown-linux-musl >/dev/null
  version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
  bin="$PWD/dist/ha-edge-$version-x86_64-unknown-linux-musl"
fi
work=/var/tmp/ha-edge-reconnect
rm -rf "$work"
mkdir -p "$work/src" "$work/landed" "$work/state"
. bench/pki.sh
bench_pki "$work/pki"
"$netlab" up --mode wire --delay "$(python3 -c "print($rtt / 2)")" --loss 0 --rate 100mbit >/dev/null
trap '"$netlab" down >/dev/null 2>&1 || true; kill "${relay:-0}" "${agent:-0}" 2>/dev/null || true' EXIT
cat >"$work/relay.toml" <<TOML
[relay]
$(bench_relay_tls "$work/pki")
state_dir = "$work/state"
[[agent]]
identity = "agent.bench"
prefix = "r/"
[store]
type = "dir"
path = "$work/landed"
TOML
cat >"$work/agent.toml" <<TOML
[agent]
journal = "$work/journal.db"
# Bounds the QUIC idle timeout: a cut is noticed within 3 s.
request_timeout = "3s"
[[source]]
name = "r"
type = "fs"
path = "$work/src"
settle = "0s"
[destination]
$(bench_agent_tls "$work/pki")
prefix = "r/"
TOML
ip netns exec cloud "$bin" relay -c "$work/relay.toml" 2>"$work/relay.log" &
relay=$!
sleep 1
ip netns exec onprem "$bin" run -c "$work/agent.toml" 2>"$work/agent.log" &
agent=$!
for i in $(seq 0 "$cuts"); do
  echo "{\"round\":$i}" >"$work/src/f$i.ndjson"
  for _ in $(seq 300); do [ -e "$work/landed/r/f$i.ndjson" ] && break; sleep 0.1; done
  [ -e "$work/landed/r/f$i.ndjson" ] || { echo "f$i did not land" >&2; tail "$work/agent.log" >&2; exit 1; }
  [ "$i" = "$cuts" ] && break
  "$netlab" cut blackhole >/dev/null
  sleep 8
  "$netlab" restore >/dev/null
done
echo "RTT $rtt ms; $(uname -r), $(nproc) cores."
echo
echo "| connection | setup | 0-RTT |"
echo "|---|---|---|"
n=0
grep -o 'connected to the relay.*' "$work/agent.log" | while read -r line; do
  n=$((n + 1))
  ms=$(sed -n 's/.*setup_ms=\([0-9]*\).*/\1/p' <<<"$line")
  early=$(sed -n 's/.*early_data=\([a-z]*\).*/\1/p' <<<"$line")
  echo "| $n | $ms ms | $early |"
done
