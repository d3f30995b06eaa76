#!/usr/bin/env bash
# Over an emulated VPN link: the direct S3 path, the QUIC relay and rclone side by side in one
# run, on a grid of round-trip times and loss rates. Each cell moves one large file (throughput
# against the link rate) and many 20 KiB files (files/s). The agent and rclone run in the
# `onprem` network namespace; s3s-fs and the relay (landing in that s3s-fs) in `cloud`, joined by
# the WAN emulator (netlab: userspace delay, kernel loss, tbf rate limit). Root only.
#
#   NETLAB=path/to/netlab.sh bench/link.sh [--rtt 5,20,40] [--loss 0,0.5,1] [--rate 100mbit]
#        [--rounds 1] [--tools ha-edge,ha-edge-quic,rclone] [--size-mib 256] [--files 1000]
#        [--workloads big,small]    (the large file, the small files, or both)
#        [--congestion bbr|cubic]   (both ends of the QUIC link; default: the built-in one)
#        [--tcp-congestion cubic|bbr|reno]   (the kernel's TCP controller in both namespaces, for
#                                    the direct path, rclone and iperf3; default: the system's)
#
# Besides ha-edge, ha-edge-quic and rclone, --tools takes the link's ceilings, for the large
# file only: ha-edge-1put (ha-edge with one PUT for the file: one TCP flow, no multipart
# completion), tcp-1 and tcp-4 (iperf3 moving as many bytes over one and four TCP flows).
#   bench/run.sh --link ...          (the same)
#
# Loss is each way; RTT is twice netlab's one-way delay. Settings as in bench/run.sh: 4 objects
# and 4 parts of 8 MiB in flight, multipart from 16 MiB (rclone --transfers 4
# --s3-upload-concurrency 4 --s3-chunk-size 8M --s3-upload-cutoff 16M). A run ends when every
# object is in the bucket (for the relay: landed and verified by it). Prints a Markdown table per
# cell and tool, the ratios of QUIC to direct, and the relay's CPU seconds per GB.
# Builds the static release binary first (HA_EDGE_BIN=path measures that binary instead);
# scratch space in /var/tmp/ha-edge-link.
set -euo pipefail
cd "$(dirname "$0")/.."
rtts=5,20,40 losses=0,0.5,1 rate=100mbit rounds=1 tools=ha-edge,ha-edge-quic,rclone
size_mib=256 files=1000 congestion= workloads=big,small tcp_cc=
while [ $# -gt 0 ]; do
  case "$1" in
    --rtt) rtts="$2"; shift 2 ;;
    --loss) losses="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --tools) tools="$2"; shift 2 ;;
    --size-mib) size_mib="$2"; shift 2 ;;
    --files) files="$2"; shift 2 ;;
    --congestion) congestion="$2"; shift 2 ;;
    --workloads) workloads="$2"; shift 2 ;;
    --tcp-congestion) tcp_cc="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
netlab="${NETLAB:?set NETLAB to the WAN emulator (netlab.sh)}"
scripts/install-s3s-fs.sh >/dev/null
command -v rclone >/dev/null || { apt-get update -qq && apt-get install -y -qq rclone; }
# netlab's random loss is an nftables rule.
command -v nft >/dev/null || { apt-get update -qq && apt-get install -y -qq nftables; }
if [[ ",$tools," == *,tcp-* ]]; then
  command -v iperf3 >/dev/null || { apt-get update -qq && apt-get install -y -qq iperf3; }
fi
if [ -n "${HA_EDGE_BIN:-}" ]; then
  bin="$(realpath "$HA_EDGE_BIN")"   # another build, e.g. a commit before a change
else
  packaging/build.sh --no-package x86_64-unknown-linux-musl >/dev/null
  version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
  bin="$PWD/dist/ha-edge-$version-x86_64-unknown-linux-musl"
fi
s3s="${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs"
unset AWS_CA_BUNDLE
work=/var/tmp/ha-edge-link
rm -rf "$work/s3" "$work/runs" "$work/relay-state"
mkdir -p "$work/big" "$work/small" "$work/s3/quic" "$work/runs" "$work/pki"
if [ "$(stat -c %s "$work/big/one.bin" 2>/dev/null || echo 0)" != $((size_mib << 20)) ]; then
  head -c $((size_mib << 20)) /dev/urandom >"$work/big/one.bin"
fi
if [ "$(ls "$work/small" | wc -l)" != "$files" ]; then
  rm -f "$work/small"/*
  for i in $(seq 0 $((files - 1))); do head -c 20480 /dev/urandom >"$work/small/f$i.ndjson"; done
fi
touch -d '1 hour ago' "$work/big/one.bin" "$work/small"/*

# Certificates for the relay and the agent (openssl), as an operator would make them.
. bench/pki.sh
bench_pki "$work/pki"
cc_line=""
[ -n "$congestion" ] && cc_line="congestion = \"$congestion\""

first_rtt=${rtts%%,*} first_loss=${losses%%,*}
"$netlab" up --mode wire --delay "$(python3 -c "print($first_rtt / 2)")" --loss "$first_loss" --rate "$rate" >/dev/null
trap '"$netlab" down >/dev/null 2>&1 || true; kill "${server:-0}" "${relay:-0}" 2>/dev/null || true' EXIT
if [ -n "$tcp_cc" ]; then
  # A namespace may only choose a controller the host allows (tcp_allowed_congestion_control):
  # allowed for the run, the host's list restored at the end.
  allowed=$(sysctl -n net.ipv4.tcp_allowed_congestion_control)
  if [[ " $allowed " != *" $tcp_cc "* ]]; then
    sysctl -qw "net.ipv4.tcp_allowed_congestion_control=$allowed $tcp_cc"
    trap 'sysctl -qw "net.ipv4.tcp_allowed_congestion_control=$allowed"; "$netlab" down >/dev/null 2>&1 || true; kill "${server:-0}" "${relay:-0}" 2>/dev/null || true' EXIT
  fi
  for ns in onprem cloud; do ip netns exec "$ns" sysctl -qw "net.ipv4.tcp_congestion_control=$tcp_cc"; done
fi
tcp_cc_now=$(ip netns exec onprem sysctl -n net.ipv4.tcp_congestion_control)
ip netns exec cloud "$s3s" --host 198.18.0.2 --port 19557 --access-key AK --secret-key SKSKSKSK "$work/s3" >/dev/null 2>&1 &
server=$!
cat >"$work/relay.toml" <<TOML
[relay]
$(bench_relay_tls "$work/pki")
state_dir = "$work/relay-state"
log_level = "warn"
$cc_line
[[agent]]
identity = "agent.bench"
prefix = "bench/"
[store]
type = "s3"
endpoint = "http://198.18.0.2:19557"
region = "us-east-1"
bucket = "quic"
path_style = true
part_size = "8MiB"
TOML
AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SKSKSKSK ip netns exec cloud "$bin" relay -c "$work/relay.toml" 2>"$work/relay.log" &
relay=$!
sleep 1
kill -0 "$relay" || { cat "$work/relay.log" >&2; exit 1; }
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

cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }

# One run: prints "seconds relay-cpu-seconds" after checking the bucket holds every file.
run() {
  local tool="$1" w="$2" name="$3" r="$work/runs/$3" landed
  mkdir -p "$r"
  case "$tool" in
    tcp-1 | tcp-4)
      # The same number of bytes through iperf3 (the server answers one test, then exits).
      ip netns exec cloud iperf3 -s -1 -B 198.18.0.2 -p 5201 >"$r/server.log" 2>&1 &
      local server_pid=$! t0 t1
      sleep 0.5
      t0=$(date +%s.%N)
      ip netns exec onprem iperf3 -c 198.18.0.2 -p 5201 -n "${size_mib}M" -P "${tool#tcp-}" >"$r/log" 2>&1 ||
        { cat "$r/log" >&2; exit 1; }
      t1=$(date +%s.%N)
      wait "$server_pid" || true
      echo "$(python3 -c "print($t1 - $t0)") 0"
      return ;;
  esac
  if [ "$tool" = ha-edge-quic ]; then landed="$work/s3/quic/bench/$name"; else landed="$work/s3/$name"; mkdir -p "$landed"; fi
  local dest
  if [ "$tool" = ha-edge-quic ]; then
    dest="$(bench_agent_tls "$work/pki")
prefix = \"bench/$name/\"
$cc_line"
  else
    dest="type = \"s3\"
endpoint = \"http://198.18.0.2:19557\"
region = \"us-east-1\"
bucket = \"$name\"
path_style = true"
  fi
  cat >"$r/agent.toml" <<TOML
[agent]
journal = "$r/journal.db"
log_level = "warn"
concurrency = 4
parts_in_flight = 4
part_size = "8MiB"
multipart_threshold = "$([ "$tool" = ha-edge-1put ] && echo 1GiB || echo 16MiB)"
[[source]]
name = "bench"
type = "fs"
path = "$work/$w"
[destination]
$dest
TOML
  local t0 t1 c0 c1
  c0=$(cpu "$relay")
  t0=$(date +%s.%N)
  case "$tool" in
    ha-edge | ha-edge-quic | ha-edge-1put)
      AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SKSKSKSK ip netns exec onprem "$bin" run --once -c "$r/agent.toml" >"$r/log" 2>&1 ;;
    rclone)
      RCLONE_CONFIG="$work/rclone.conf" ip netns exec onprem rclone copy "$work/$w" "cloud:$name" \
        --transfers 4 --checkers 8 --s3-upload-concurrency 4 --s3-chunk-size 8M \
        --s3-upload-cutoff 16M >"$r/log" 2>&1 ;;
  esac
  t1=$(date +%s.%N)
  c1=$(cpu "$relay")
  local want got
  want=$(ls "$work/$w" | wc -l)
  got=$(find "$landed" -type f 2>/dev/null | wc -l)
  [ "$want" = "$got" ] || { echo "$tool $w: $got of $want objects" >&2; cat "$r/log" >&2; exit 1; }
  cmp -s "$work/big/one.bin" "$landed/one.bin" 2>/dev/null || [ "$w" = small ] || { echo "$tool: landed object differs" >&2; exit 1; }
  rm -rf "$landed"
  echo "$(python3 -c "print($t1 - $t0)") $(python3 -c "print($c1 - $c0)")"
}

# The median of its arguments; a workload not run is float("nan") (shown as nan).
med() { printf '%s\n' "$@" | sort -g | awk 'NF {a[++n]=$1} END {print n ? a[int((n+1)/2)] : "float(\"nan\")"}'; }
IFS=, read -ra tool_list <<<"$tools"
IFS=, read -ra rtt_list <<<"$rtts"
IFS=, read -ra loss_list <<<"$losses"
IFS=, read -ra workload_list <<<"$workloads"
has() { [[ ",$workloads," == *,$1,* ]]; }
declare -A secs relay_cpu
n=0
for rtt in "${rtt_list[@]}"; do
  for loss in "${loss_list[@]}"; do
    "$netlab" set --delay "$(python3 -c "print($rtt / 2)")" --loss "$loss" --rate "$rate" >/dev/null
    for round in $(seq 1 "$rounds"); do
      for w in "${workload_list[@]}"; do
        # The ceilings are for the large file only.
        tools_now=()
        for tool in "${tool_list[@]}"; do
          [[ "$w" = small && "$tool" =~ ^(tcp-1|tcp-4|ha-edge-1put)$ ]] || tools_now+=("$tool")
        done
        # Alternate the order of the tools from one round (and cell) to the next.
        order=("${tools_now[@]}")
        [ $(((round + n) % 2)) = 0 ] && order=($(printf '%s\n' "${tools_now[@]}" | tac))
        for tool in "${order[@]}"; do
          read -r s c < <(run "$tool" "$w" "${tool//-/}-$w-$rtt-${loss/./}-$round")
          echo "RTT $rtt ms, loss $loss %, round $round, $w, $tool: ${s}s" >&2
          secs[$rtt/$loss/$tool/$w]="${secs[$rtt/$loss/$tool/$w]:-} $s"
          [ "$tool" = ha-edge-quic ] && relay_cpu[$rtt/$loss/$w]="${relay_cpu[$rtt/$loss/$w]:-} $c"
        done
      done
    done
    n=$((n + 1))
  done
done

rate_mbit=$(python3 -c "import re; m=re.match(r'([0-9.]+)([kmg]?)bit', '$rate'); print(float(m[1]) * {'k': 1e-3, 'm': 1, 'g': 1e3, '': 1e-6}[m[2]])")
echo
echo "Link: netlab, $rate, loss each way; ${size_mib} MiB file and $files files of 20 KiB;"
echo "medians of $rounds round(s); QUIC congestion: ${congestion:-default}; TCP congestion: $tcp_cc_now;"
echo "$(nproc) cores, $(uname -r)."
echo
echo "| RTT | loss | tool | ${size_mib} MiB: s | Mbit/s | of link | $files files: s | files/s |"
echo "|---|---|---|---|---|---|---|---|"
for rtt in "${rtt_list[@]}"; do
  for loss in "${loss_list[@]}"; do
    for tool in "${tool_list[@]}"; do
      # shellcheck disable=SC2086
      b=$(med ${secs[$rtt/$loss/$tool/big]:-}) s=$(med ${secs[$rtt/$loss/$tool/small]:-})
      python3 -c "b=$b; s=$s; m=$size_mib*2**20*8/b/1e6
f=lambda v, spec: '-' if v != v else format(v, spec)  # a workload not run
print(f'| $rtt ms | $loss % | $tool | {f(b, \".1f\")} | {f(m, \".1f\")} | {f(m/$rate_mbit, \".0%\")} | {f(s, \".1f\")} | {f($files/s, \".0f\")} |')"
    done
  done
done
echo
echo "Relay peak RSS over the run: $(awk '/VmHWM/ {printf "%.1f MiB", $2 / 1024}' "/proc/$relay/status")."
if [[ ",$tools," == *,ha-edge-quic,* && ",$tools," == *,ha-edge,* ]]; then
  echo
  echo "| RTT | loss | QUIC / direct, large file throughput | QUIC / direct, files/s | relay CPU s per GB (large) |"
  echo "|---|---|---|---|---|"
  for rtt in "${rtt_list[@]}"; do
    for loss in "${loss_list[@]}"; do
      # shellcheck disable=SC2086
      python3 -c "
db=$(med ${secs[$rtt/$loss/ha-edge/big]:-}); qb=$(med ${secs[$rtt/$loss/ha-edge-quic/big]:-})
ds=$(med ${secs[$rtt/$loss/ha-edge/small]:-}); qs=$(med ${secs[$rtt/$loss/ha-edge-quic/small]:-})
c=$(med ${relay_cpu[$rtt/$loss/big]:-})
f=lambda v, spec: '-' if v != v else format(v, spec)  # a workload not run
print(f'| $rtt ms | $loss % | {f(db/qb, \".2f\")}x | {f(ds/qs, \".2f\")}x | {f(c/($size_mib/1024), \".1f\")} |')"
    done
  done
fi
