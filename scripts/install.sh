#!/usr/bin/env bash
# Installs clip on this machine: system packages, a release build, /usr/local/bin/clip,
# /etc/clip/config.toml (kept if present) and the clip-snapshotter systemd unit (enabled and
# started when systemd runs). containerd's side: see docs/containerd/config-v2.toml (containerd 1.x) or docs/containerd/config-v3.toml (2.x).
# Usage (as root): bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/install-deps.sh
echo "==> building clip (release)"
cargo build --release --quiet -p clip-snapshotter
install -m 0755 target/release/clip /usr/local/bin/clip
# The configuration may hold secrets (a Redis URL with its password): root's alone.
install -d -m 0700 /etc/clip
if [[ -e /etc/clip/config.toml ]]; then
  echo "==> keeping the existing /etc/clip/config.toml (made 0600: it may hold secrets)"
  chmod 0600 /etc/clip/config.toml
else
  install -m 0600 scripts/config.toml /etc/clip/config.toml
fi
install -m 0644 scripts/clip-snapshotter.service /etc/systemd/system/clip-snapshotter.service
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl enable --now clip-snapshotter.service
  echo "==> clip-snapshotter.service started; now add docs/containerd/config-v2.toml (containerd 1.x) or docs/containerd/config-v3.toml (2.x) to /etc/containerd/config.toml and restart containerd"
else
  echo "==> no systemd here: run 'clip snapshotter' yourself"
fi
