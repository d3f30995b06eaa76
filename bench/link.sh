#!/usr/bin/env bash
# The direct path over an emulated VPN link, side by side with rclone in the same run: one
# 256 MiB file (throughput against the link rate) and 1,000 files of 20 KiB (files/s). The
# agent and rclone run in the `onprem` network namespace, s3s-fs in `cloud`, joined by the WAN
# emulator (netlab: userspace delay, kernel loss and rate limit). Root only.
#
#   NETLAB=path/to/netlab.sh bench/link.sh [--delay MS] [--loss PCT] [--rate RATE] [--rounds N]
#
# Defaults: --delay 20 (RTT ~40 ms) --loss 1 (each way) --rate 100mbit --rounds 2. Settings as
# in bench/run.sh: 4 objects and 4 parts of 8 MiB in flight, multipart from 16 MiB (rclone
# --transfers 4 --s3-upload-concurrency 4 --s3-chunk-size 8M --s3-upload-cutoff 16M).
# Builds the static release binary first; scratch space in /var/tmp/ha-edge-link.
set -euo pipefail
cd "$(dirname "$0")/.."
delay=20 loss=1 rate=100mbit rounds=2
while [ $# -gt 0 ]; do
  case "$1" in
    --delay) delay="$2"; shift 2 ;;
    --loss) loss="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
netlab="${NETLAB:?set NETLAB to the WAN emulator (netlab.sh)}"
scripts/install-s3s-fs.sh >/dev/null
command -v rclone >/dev/null || { apt-get update -qq && apt-get install -y -qq rclone; }
packaging/build.sh --no-package x86_64-unknown-linux-musl >/dev/null
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
bin="$PWD/dist/ha-edge-$version-x86_64-unknown-linux-musl"
s3s="${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs"
unset AWS_CA_BUNDLE
work=/var/tmp/ha-edge-link
rm -rf "$work/s3" "$work/runs"; mkdir -p "$work/big" "$work/small" "$work/s3" "$work/runs"
[ -f "$work/big/one.bin" ] || head -c $((256 << 20)) /dev/urandom >"$work/big/one.bin"
if [ "$(ls "$work/small" | wc -l)" != 1000 ]; then
  for i in $(seq 0 999); do head -c 20480 /dev/urandom >"$work/small/f$i.ndjson"; done
fi
touch -d '1 hour ago' "$work/big/one.bin" "$work/small"/*

"$netlab" up --mode wire --delay "$delay" --loss "$loss" --rate "$rate" >/dev/null
trap '"$netlab" down >/dev/null 2>&1 || true; kill "${server:-0}" 2>/dev/null || true' EXIT
ip netns exec cloud "$s3s" --host 198.18.0.2 --port 19557 --access-key AK --secret-key SKSKSKSK "$work/s3" >/dev/null 2>&1 &
server=$!
sleep 1
cat >"$work/rclone.conf" <<EOF
[cloud]
type = s3
provider = Other
endpoint = http://198.18.0.2:19557
force_path_style = true
region = us-east-1
access_key_id = AK
secret_access_key = SKSKSKSK
EOF

# One run: prints "seconds objects" after checking the bucket holds every file.
run() {
  local tool="$1" w="$2" bucket="$3" r="$work/runs/$3"
  mkdir -p "$r" "$work/s3/$bucket"
  local t0 t1
  t0=$(date +%s.%N)
  if [ "$tool" = ha-edge ]; then
    cat >"$r/agent.toml" <<TOML
[agent]
journal = "$r/journal.db"
log_level = "warn"
concurrency = 4
parts_in_flight = 4
part_size = "8MiB"
multipart_threshold = "16MiB"
[[source]]
name = "bench"
type = "fs"
path = "$work/$w"
[destination]
type = "s3"
endpoint = "http://198.18.0.2:19557"
region = "us-east-1"
bucket = "$bucket"
path_style = true
TOML
    AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SKSKSKSK ip netns exec onprem "$bin" run --once -c "$r/agent.toml" >"$r/log" 2>&1
  else
    RCLONE_CONFIG="$work/rclone.conf" ip netns exec onprem rclone copy "$work/$w" "cloud:$bucket" \
      --transfers 4 --checkers 8 --s3-upload-concurrency 4 --s3-chunk-size 8M \
      --s3-upload-cutoff 16M >"$r/log" 2>&1
  fi
  t1=$(date +%s.%N)
  local want got
  want=$(ls "$work/$w" | wc -l)
  got=$(find "$work/s3/$bucket" -type f | wc -l)
  [ "$want" = "$got" ] || { echo "$tool $w: $got of $want objects" >&2; cat "$r/log" >&2; exit 1; }
  echo "$(python3 -c "print($t1 - $t0)") $want"
}

med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A secs
for round in $(seq 1 "$rounds"); do
  for w in big small; do
    for tool in ha-edge rclone; do
      [ $((round % 2)) = 0 ] && tool=$([ "$tool" = ha-edge ] && echo rclone || echo ha-edge)
      read -r s n < <(run "$tool" "$w" "${tool//-/}-$w-$round")
      echo "round $round $w $tool ${s}s" >&2
      secs[$tool-$w]="${secs[$tool-$w]:-} $s"
    done
  done
done
rate_mbit=$(python3 -c "import re; m=re.match(r'([0-9.]+)([kmg]?)bit', '$rate'); print(float(m[1]) * {'k': 1e-3, 'm': 1, 'g': 1e3, '': 1e-6}[m[2]])")
echo
echo "Link: RTT $((2 * delay)) ms, ${loss} % loss each way, $rate (netlab); medians of $rounds rounds."
echo
echo "| workload | tool | seconds | Mbit/s | share of the link | files/s |"
echo "|---|---|---|---|---|---|"
for w in big small; do
  for tool in ha-edge rclone; do
    # shellcheck disable=SC2086
    s=$(med ${secs[$tool-$w]})
    if [ "$w" = big ]; then
      python3 -c "s=$s; b=256*2**20; print(f'| one 256 MiB file | $tool | {s:.1f} | {b*8/s/1e6:.1f} | {b*8/s/1e6/$rate_mbit:.0%} | |')"
    else
      python3 -c "s=$s; print(f'| 1,000 files of 20 KiB | $tool | {s:.1f} | | | {1000/s:.0f} |')"
    fi
  done
done
# shellcheck disable=SC2086
python3 -c "
h=$(med ${secs[ha-edge-small]}); r=$(med ${secs[rclone-small]})
print(f'\nfiles/s ha-edge / rclone: {r/h:.2f}')"
