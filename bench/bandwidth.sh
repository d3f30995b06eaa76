#!/usr/bin/env bash
# Bandwidth limit accuracy: ha-edge sends about 60 s worth of data at each limit and the rate it
# achieved is read from its own receipts (bytes / (last verified - first upload started)).
#
#   bench/bandwidth.sh [--limits 10Mbit,40Mbit] [--seconds 60] [--link "--delay 20 --rate 100mbit"]
#
# With the WAN emulator (NETLAB=path/to/netlab.sh, root), the agent runs in its `onprem`
# namespace and s3s-fs in `cloud`, over the emulated link; without it, on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
limits="10Mbit,40Mbit"
seconds=60
link="--mode wire --delay 20 --rate 100mbit"
while [ $# -gt 0 ]; do
  case "$1" in
    --limits) limits="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --link) link="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
scripts/install-s3s-fs.sh >/dev/null
s3s="${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs"
bin="${HA_EDGE_BIN:-target/release/ha-edge}"
[ -x "$bin" ] || cargo build --release --locked
work="$(mktemp -d /var/tmp/ha-edge-bw.XXXXXX)"
netlab="${NETLAB:-}"
host=127.0.0.1
in_onprem=()
in_cloud=()
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  [ -n "$netlab" ] && "$netlab" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ -n "$netlab" ]; then
  # shellcheck disable=SC2086
  "$netlab" up $link >/dev/null
  host=198.18.0.2
  in_onprem=(ip netns exec onprem)
  in_cloud=(ip netns exec cloud)
fi
mkdir -p "$work/s3"
port=19555
"${in_cloud[@]}" "$s3s" --host "$host" --port "$port" --access-key AK --secret-key SKSKSKSK "$work/s3" \
  >/dev/null 2>&1 &
server=$!
sleep 1
echo "| limit | bytes | seconds | achieved | error |"
echo "|---|---|---|---|---|"
IFS=, read -ra all <<<"$limits"
for limit in "${all[@]}"; do
  bits=$(python3 -c "import re,sys; m=re.match(r'([0-9.]+)(k|M|G)?bit',sys.argv[1]); print(float(m.group(1))*{None:1,'k':1e3,'M':1e6,'G':1e9}[m.group(2)])" "$limit")
  total=$(python3 -c "print(int($bits/8*$seconds))")
  run="$work/run-$limit"
  mkdir -p "$run/in" "$work/s3/bw-${limit,,}"
  # Eight files of equal size, settled.
  for i in $(seq 1 8); do head -c $((total / 8)) /dev/urandom >"$run/in/f$i.bin"; done
  touch -d '1 hour ago' "$run/in"/*
  cat >"$run/agent.toml" <<TOML
[agent]
journal = "$run/journal.db"
bandwidth = "$limit"
log_level = "warn"
[[source]]
name = "bw"
type = "fs"
path = "$run/in"
[destination]
type = "s3"
endpoint = "http://$host:$port"
region = "eu-central-1"
bucket = "bw-${limit,,}"
path_style = true
TOML
  AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SKSKSKSK "${in_onprem[@]}" "$bin" run --once -c "$run/agent.toml" 2>"$run/log"
  "$bin" receipts -c "$run/agent.toml" | python3 -c "
import json, sys, datetime
rs = [json.loads(l) for l in sys.stdin]
t = lambda s: datetime.datetime.fromisoformat(s.replace('Z', '+00:00')).timestamp()
start = min(t(r['upload_started_at']) for r in rs)
end = max(t(r['verified_at']) for r in rs)
size = sum(r['source']['size'] for r in rs)
rate = size * 8 / (end - start)
print(f'| $limit | {size} | {end - start:.1f} | {rate / 1e6:.2f} Mbit/s | {(rate / $bits - 1) * 100:+.1f} % |')
"
done
