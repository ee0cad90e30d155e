#!/usr/bin/env bash
# Runs the whole bastion test suite on a fresh Debian machine, installing what the tests
# need first. This is the command README.md documents and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- what the tests need --------------------------------------------------------------
# Go and Debian's xtaci/smux: the real smux peer of crates/bastion-proto/tests/smux_interop.rs.
packages=()
command -v go >/dev/null 2>&1 || packages+=(golang-go)
[ -d /usr/share/gocode/src/github.com/xtaci/smux ] || packages+=(golang-github-xtaci-smux-dev)
# A real PostgreSQL server and psql: the end-to-end tests tunnel queries to it.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
command -v psql >/dev/null 2>&1 || packages+=(postgresql-client)
# A real MariaDB server and the mariadb client: tests/e2e/mariadb_e2e.rs tunnels to it.
# (mariadbd lives in /usr/sbin, which is not on every user's PATH.)
{ command -v mariadbd || [ -x /usr/sbin/mariadbd ]; } >/dev/null 2>&1 || packages+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || packages+=(mariadb-client)
# moto_server and awscli v1 (PyPI) in a venv: the EC2 endpoint of tests/e2e/sim_ec2.rs, and
# the `aws ssm start-session` that spawns our plugin drop-in in tests/e2e/awscli_dropin.rs.
# Debian's python3 needs python3-venv for `python3 -m venv`.
venv="${BASTION_TEST_VENV:-target/test-venv}"
# Pinned: the simulator answers the AMI ids of moto's data set (src/sim/service.rs
# PUBLIC_PARAMETERS), which moto changes between releases; the stamp file says which
# pins an existing venv was made with.
python_pins="moto[server]==5.2.6 awscli==1.46.3"
venv_ready() {
  [ -x "$venv/bin/moto_server" ] && [ -x "$venv/bin/aws" ] &&
    [ "$(cat "$venv/.bastion-pins" 2>/dev/null)" = "$python_pins" ]
}
if ! venv_ready; then
  command -v python3 >/dev/null 2>&1 || packages+=(python3)
  python3 -m venv --help >/dev/null 2>&1 || packages+=(python3-venv)
fi
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing test dependencies: ${packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}"
fi

if ! venv_ready; then
  echo "installing moto[server] and awscli into $venv"
  if [ -x "$venv/bin/pip" ]; then
    : # the venv exists (e.g. from an older version of this script): add what is missing
  elif ! python3 -m venv "$venv"; then
    # Debian: `venv --help` works without python3-venv, but creating one needs ensurepip.
    rm -rf "$venv"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC2086 # the pins are words
  "$venv/bin/pip" install -q $python_pins
  echo "$python_pins" >"$venv/.bastion-pins"
fi

# --- checks ---------------------------------------------------------------------------
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --all-targets
# `--all-targets` leaves out doctests.
cargo test --locked --workspace --doc
# The fuzz targets build (with the stable toolchain: no sanitizer, no run) so that an
# API change in bastion-proto cannot leave them broken; fuzz/README.md runs them.
cargo check --locked --manifest-path fuzz/Cargo.toml --bins
