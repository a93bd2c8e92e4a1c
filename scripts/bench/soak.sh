#!/usr/bin/env bash
# Soak run (issue "Weeks of uptime"): real containerd + runc, the local registry behind a
# fault-injecting proxy, image versions over shared bases, containers started, read and removed
# concurrently; SIGKILL of the daemon every few minutes, registry faults, the cache disk filled
# to ENOSPC. Every byte read is checked; RSS, descriptors, threads and disk are sampled.
#
# usage (as root): scripts/bench/soak.sh DURATION_SECONDS [OUT_DIR]
#   OUT_DIR (default /var/tmp/clip-soak) gets soak.csv, summary.json and soak.png (with
#   python3-matplotlib). Exits non-zero unless every pass criterion holds (see soak.py).
#   CLIP_BIN picks the binary (default target/release/clip, built if missing); the SOAK_*
#   variables in soak.py tune the workload. CI runs `soak.sh 300` on the debug build.
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ $# -ge 1 ]] || { sed -n 2,12p "$0"; exit 2; }
[[ $(id -u) = 0 ]] || { echo "soak.sh: run as root (containerd, mounts, a loop device)" >&2; exit 2; }
export PATH="$HOME/.cargo/bin:$PATH"
export CLIP_BIN=${CLIP_BIN:-$PWD/target/release/clip}
if [[ ! -x $CLIP_BIN ]]; then
  echo "building $CLIP_BIN"
  cargo build --release --quiet -p clip-snapshotter
fi
out=${2:-/var/tmp/clip-soak}
# A previous run's leftovers: mounts (FUSE, the loop-mounted cache) first, then the files.
if [[ -d $out ]]; then
  awk -v d="$out" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$out"
fi
mkdir -p "$out"
# Debian's python, where its python3-matplotlib goes. The plot needs it (SOAK_PLOT=0: no plot,
# nothing installed; CI's short run).
py=/usr/bin/python3
if [[ ${SOAK_PLOT:-1} != 0 ]] && ! $py -c 'import matplotlib' 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-matplotlib >/dev/null
fi
$py scripts/bench/soak.py "$1" "$out"
