#!/usr/bin/env bash
# Installs s3s-fs, the S3-compatible test server (verifies SigV4, supports multipart uploads),
# into /opt/s3s-fs (or $S3S_FS_ROOT). Does nothing if it is already there.
# 0.17.0 declares rustc 1.96 but builds and works with 1.95 (--ignore-rust-version); if that
# install fails, 0.14.1 is the fallback (looser checks, same interface).
set -euo pipefail
root="${S3S_FS_ROOT:-/opt/s3s-fs}"
bin="$root/bin/s3s-fs"
if [ -x "$bin" ]; then
  echo "s3s-fs: already installed at $bin"
  exit 0
fi
echo "s3s-fs: installing into $root (a few minutes on first use)..."
if ! cargo install s3s-fs --version 0.17.0 --features binary --locked --ignore-rust-version --root "$root"; then
  echo "s3s-fs 0.17.0 failed to install; trying 0.14.1" >&2
  cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$root"
fi
echo "s3s-fs: installed at $bin"
