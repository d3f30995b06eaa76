#!/usr/bin/env bash
# The test suite: unit tests plus end-to-end tests of the real ha-edge binary against a real
# S3-compatible server (s3s-fs) on 127.0.0.1, installed here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-s3s-fs.sh
export HA_EDGE_S3S_FS="${HA_EDGE_S3S_FS:-${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs}"
exec cargo test --workspace --locked "$@"
