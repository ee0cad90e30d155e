#!/usr/bin/env bash
# Runs the whole bastion test suite on a fresh Debian machine, installing what the tests
# need first. This is the command README.md documents and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- what the tests need --------------------------------------------------------------
# Go and Debian's xtaci/smux: the real smux peer of tests/smux_interop.rs.
packages=()
command -v go >/dev/null 2>&1 || packages+=(golang-go)
[ -d /usr/share/gocode/src/github.com/xtaci/smux ] || packages+=(golang-github-xtaci-smux-dev)
# A real PostgreSQL server and psql: the end-to-end tests tunnel queries to it.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
command -v psql >/dev/null 2>&1 || packages+=(postgresql-client)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing test dependencies: ${packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}"
fi

# --- checks ---------------------------------------------------------------------------
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
