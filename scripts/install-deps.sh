#!/usr/bin/env bash
# Installs every system package clip's build, demo and tests need on Debian 12.
# Idempotent: packages already present are left alone. Must run as root.
set -euo pipefail

PACKAGES=(
  # build
  build-essential pkg-config protobuf-compiler git ca-certificates curl
  # real parts the tests and demo run against
  containerd runc docker-registry redis-server redis-tools fuse3 containernetworking-plugins
  # image building without any public registry
  skopeo umoci busybox-static debootstrap
  # auth tests (TLS certs, htpasswd) and helpers
  openssl apache2-utils jq iproute2 python3 e2fsprogs
  # runs runc 1.3 from Debian's development suite on this glibc (scripts/debian-runc.sh)
  patchelf
  # containerd's snapshotter test suite (containerd 1.6's Go sources) and the Go to build it
  golang-go golang-github-containerd-containerd-dev
)

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: must run as root (apt-get, FUSE and containerd need it)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-deps: all system packages present"
fi

# Debian's packages start services we do not want: the tests start their own instances.
for svc in docker-registry redis-server containerd; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "install-deps: cargo found in \$HOME/.cargo/bin (add it to PATH)"
  else
    echo "install-deps: no Rust toolchain; install rustup (https://rustup.rs) first" >&2
    exit 1
  fi
fi
echo "install-deps: done"
