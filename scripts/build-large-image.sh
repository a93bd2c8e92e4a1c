#!/usr/bin/env bash
# Builds the "large" test image as an OCI layout, with no container registry access:
#   layer 1: debootstrap --variant=minbase bookworm
#   layer 2: + python3, numpy          layer 3: + gcc, g++          layer 4: + perl, scipy
# Each upper layer is an overlayfs upper dir (its whiteouts become OCI whiteouts).
# Output: $CLIP_IMAGE_CACHE/large (default /var/cache/clip-test-images/large); reused if complete.
# Usage: build-large-image.sh [OUT_DIR]
set -euo pipefail
CACHE=${CLIP_IMAGE_CACHE:-/var/cache/clip-test-images}
OUT=${1:-$CACHE/large}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")" && pwd)

if [[ -f $OUT/index.json ]]; then
  echo "large image: using $OUT (delete it to rebuild)"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "build-large-image: must run as root (debootstrap, mounts)" >&2; exit 1; }

WORK=$(mktemp -d /var/tmp/clip-large.XXXXXX)
MOUNTS=()
cleanup() {
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "large image: debootstrap minbase (about a minute)..."
start=$(date +%s)
debootstrap --variant=minbase bookworm "$WORK/l1" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
  tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
rm -rf "$WORK/l1/var/cache/apt/archives/"*.deb "$WORK/l1/var/lib/apt/lists/"* 2>/dev/null || true
echo "large image: base done in $(( $(date +%s) - start ))s"

lower="$WORK/l1"
layers=("dir:$WORK/l1")
n=2
for pkgs in "python3 python3-numpy" "gcc g++" "perl python3-scipy"; do
  up="$WORK/l$n"; wk="$WORK/w$n"; mnt="$WORK/m$n"
  mkdir -p "$up" "$wk" "$mnt"
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$up,workdir=$wk" "$mnt"; MOUNTS+=("$mnt")
  mount -t proc proc "$mnt/proc"; MOUNTS+=("$mnt/proc")
  mount --bind /dev "$mnt/dev"; MOUNTS+=("$mnt/dev")
  cp /etc/resolv.conf "$mnt/etc/resolv.conf" 2>/dev/null || true
  echo "large image: layer $n: installing $pkgs..."
  chroot "$mnt" /bin/sh -c "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*" \
    || { echo "build-large-image: apt-get in chroot failed" >&2; exit 1; }
  umount "$mnt/dev" "$mnt/proc" "$mnt"; MOUNTS=("${MOUNTS[@]:0:${#MOUNTS[@]}-3}")
  rm -rf "$up/proc" "$up/dev" 2>/dev/null || true
  layers+=("dir:$up")
  lower="$up:$lower"
  n=$((n+1))
done

echo "large image: writing OCI layout..."
rm -rf "$OUT.tmp"; mkdir -p "$(dirname "$OUT")"
python3 "$HERE/mkimage.py" layout "$OUT.tmp" large "${layers[@]}"
mv "$OUT.tmp" "$OUT"
echo "large image: done in $(( $(date +%s) - start ))s: $OUT"
