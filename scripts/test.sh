#!/usr/bin/env bash
# The test suite: unit tests plus end-to-end tests of the real ha-edge binary against a real
# S3-compatible server (s3s-fs) on 127.0.0.1, installed here if missing. Extra arguments go to
# `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-s3s-fs.sh
# The discovery tests mount a FUSE mirror (bindfs) where writes bypass inotify, as on NFS.
if ! command -v bindfs >/dev/null; then
  apt-get update -qq && apt-get install -y -qq bindfs
fi
# The metrics tests check the exposition with promtool (Debian's prometheus package); the
# terminal display is tested in tmux.
if ! command -v promtool >/dev/null || ! command -v tmux >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus tmux
fi
# The https tests put a TLS front (stunnel) before s3s-fs.
if ! command -v stunnel4 >/dev/null && ! command -v stunnel >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4
fi
# The web identity tests ask a local STS (moto's server, PyPI; boto3 comes with it).
if ! python3 -c "import moto.server, boto3" 2>/dev/null; then
  pip install -q "moto[server]==5.*"
fi
export HA_EDGE_S3S_FS="${HA_EDGE_S3S_FS:-${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
