# What the test, bench and image scripts share (sourced): a step heading,
# Debian packages installed when missing, free loopback ports, a
# redis-server of the caller's own, and tools from crates.io kept under
# /var/tmp by version.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# apt_install PACKAGE... installs these Debian packages (none given: does
# nothing) without starting their system services: tests start their own on
# free loopback ports.
apt_install() {
  [ $# -gt 0 ] || return 0
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  $SUDO rm -f /usr/sbin/policy-rc.d
}

# free_port: a loopback TCP port nobody listens on now.
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# start_redis PORT [ARG...]: a redis-server on 127.0.0.1:PORT that keeps
# nothing on disk, in the background (its pid in REDIS_PID), answering
# PING when this returns.
start_redis() {
  local port=$1
  shift
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no "$@" >/dev/null 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis-server on port $port did not answer" >&2
  return 1
}

# cargo_tool CRATE VERSION [CARGO-INSTALL-ARG...]: the path of CRATE's
# binary, installed from crates.io once into
# /var/tmp/tokenpolicy-tools/CRATE-VERSION (outside the clone, by version).
cargo_tool() {
  local crate=$1 version=$2
  shift 2
  local root="/var/tmp/tokenpolicy-tools/$crate-$version"
  if [ ! -x "$root/bin/$crate" ]; then
    echo "installing $crate $version (crates.io)" >&2
    env -u CARGO_TARGET_DIR cargo install --locked --quiet "$crate" --version "$version" --root "$root" "$@" >&2
  fi
  echo "$root/bin/$crate"
}

# The versions of the crates.io tools the scripts use.
MDBOOK_VERSION=0.5.4
JUST_VERSION=1.59.0
