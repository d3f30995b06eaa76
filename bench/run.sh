#!/usr/bin/env bash
# The benchmark: ha-edge vs rclone vs the AWS CLI on one local S3 server (s3s-fs), same run,
# alternating tools over several rounds; medians and ratios are printed as Markdown tables.
#
#   bench/run.sh [--rounds N] [--workloads big,small,medium,bucket-large,bucket-small]
#                (not by default: bucket-64m, bucket-2g, file-512m: the bucket-large object as a file)
#                [--tools ha-edge,rclone,aws]   (bucket-large, bucket-small: bucket to bucket from a
#                second s3s-fs, ha-edge and rclone only)
#                [--server-storage tmpfs|disk]   (tools also: ha-edge-quic, via the QUIC relay;
#                ha-edge-custody, with metrics and receipt batches on;
#                rclone-nohead, rclone with --s3-no-head)
#                [--tls]   (the destination over https: stunnel in front of its s3s-fs)
#
# Installs what it needs: s3s-fs (cargo), rclone and awscli (apt), and builds the static
# release binary of ha-edge that the packages ship. Scratch space: /var/tmp/ha-edge-bench
# (about 4 GiB; override with --work DIR).
#   bench/run.sh --link [...]        the grid over an emulated VPN link: see bench/link.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --link ]; then
  shift
  exec bench/link.sh "$@"
fi
scripts/install-s3s-fs.sh
if ! command -v rclone >/dev/null || [ ! -x /usr/bin/aws ] || ! command -v stunnel4 >/dev/null; then
  apt-get update -qq && apt-get install -y -qq rclone awscli stunnel4
fi
packaging/build.sh --no-package x86_64-unknown-linux-musl >/dev/null
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
# rclone 1.60 fails at once against an http endpoint when AWS_CA_BUNDLE is set.
unset AWS_CA_BUNDLE
exec python3 bench/bench.py --ha-edge "dist/ha-edge-$version-x86_64-unknown-linux-musl" \
  --s3s-fs "${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs" "$@"
