#!/usr/bin/env bash
# Rescan cost: a tree of N files (default 100,000) that are all delivered already is scanned
# again by `ha-edge run --once`. Nothing may be hashed or sent again; the figures are wall time,
# peak RSS and CPU of that second run (and of the first, which uploads everything).
#
#   bench/rescan.sh [N]
#
# Installs s3s-fs if missing, builds the static release binary, keeps the server's objects on a
# tmpfs (as root) and the tree and journal under /var/tmp/ha-edge-rescan.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
scripts/install-s3s-fs.sh >/dev/null
packaging/build.sh --no-package x86_64-unknown-linux-musl >/dev/null
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
bin="$PWD/dist/ha-edge-$version-x86_64-unknown-linux-musl"
s3s="${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs"
work=/var/tmp/ha-edge-rescan
umount -q "$work/s3" 2>/dev/null || true
rm -rf "$work"
mkdir -p "$work/tree" "$work/s3" "$work/state"
mount -t tmpfs -o size=2g tmpfs "$work/s3" 2>/dev/null || echo "no tmpfs for the server (not root?): using the disk" >&2
mkdir -p "$work/s3/rescan"
python3 - "$work/tree" "$n" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:04d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}.ndjson"), "w") as f:
        f.write(f'{{"resourceType":"Patient","id":"{i}"}}\n')
    os.utime(os.path.join(d, f"f{i:06d}.ndjson"), (1.7e9, 1.7e9))
PY
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$s3s" --host 127.0.0.1 --port "$port" --access-key ak --secret-key sk "$work/s3" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; umount -q "$work/s3" 2>/dev/null || true' EXIT
sleep 1
cat > "$work/ha-edge.toml" <<TOML
[agent]
journal = "$work/state/journal.db"
concurrency = 8
log_level = "warn"

[[source]]
name = "tree"
type = "fs"
path = "$work/tree"
settle = "0s"

[destination]
type = "s3"
endpoint = "http://127.0.0.1:$port"
region = "us-east-1"
bucket = "rescan"
path_style = true
TOML
run() {
  /usr/bin/time -f "%e %M %U %S" -o "$work/time.txt" \
    env AWS_ACCESS_KEY_ID=ak AWS_SECRET_ACCESS_KEY=sk "$bin" run -c "$work/ha-edge.toml" --once 2>"$work/log.txt"
  read -r wall rss user sys < "$work/time.txt"
  echo "$1: $(tail -n 1 "$work/log.txt" | sed 's/^ha-edge: //')"
  printf '  wall %s s, peak RSS %.1f MiB, CPU %.2f s\n' "$wall" "$(echo "$rss / 1024" | bc -l)" "$(echo "$user + $sys" | bc -l)"
}
echo "tree: $n files in $((n / 1000)) directories; ha-edge $version (static); s3s-fs on 127.0.0.1"
run "first run (uploads everything)"
sync
run "rescan of the delivered tree"
run "rescan again"
