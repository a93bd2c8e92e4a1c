#!/usr/bin/env bash
# FUSE benchmarks: clip's merged mount vs the same image extracted to local disk (umoci unpack).
#   1. metadata, warm: `find -type f | wc -l` and `ls -lR` over the large image
#   2. sequential read of a 128 MiB file: cold (empty clip cache, registry bytes reported),
#      warm from clip's cache (kernel page cache dropped), hot (kernel page cache kept), vs local
#      disk (page cache dropped) and local page cache
# Usage: scripts/bench/fuse.sh [RUNS]   (root; release build; large image built)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
LAYOUT=${CLIP_LARGE_IMAGE:-/var/cache/clip-test-images/large}
[[ -x $CLIP ]] || { echo "build first: cargo build --release" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/clip-fuse-bench.XXXXXX)
MPID=""
cleanup() {
  [[ -n $MPID ]] && kill -TERM "$MPID" 2>/dev/null && wait "$MPID" 2>/dev/null
  kill "$REGISTRY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
start_registry "$WORK/registry"
python3 "$ROOT_DIR/scripts/mkimage.py" layout "$WORK/big" v1 gen:bigfile 2>/dev/null
push_layout "$LAYOUT" large large
push_layout "$WORK/big" v1 big
umoci unpack --image "$LAYOUT:large" "$WORK/large-bundle" >/dev/null
umoci unpack --image "$WORK/big:v1" "$WORK/big-bundle" >/dev/null

mount_image() { # IMAGE DIR ROOT METRICS_PORT
  mkdir -p "$2"
  "$CLIP" --root "$3" index "$1" >/dev/null
  "$CLIP" --root "$3" --metrics-address "127.0.0.1:$4" mount "$1" "$2" 2>"$3.log" &
  MPID=$!
  for _ in $(seq 200); do mountpoint -q "$2" && return 0; sleep 0.05; done
  echo "mount failed:" >&2; cat "$3.log" >&2; return 1
}
unmount_image() { kill -TERM "$MPID"; wait "$MPID" 2>/dev/null || true; MPID=""; }
registry_bytes() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^clip_registry_bytes_total/ {print $2}'; }
timeit() { local s e; s=$(now); "$@" >/dev/null 2>&1; e=$(now); echo "$e - $s" | bc; }
stats() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {printf "%.3f s (%.3f-%.3f)", a[int((NR+1)/2)], a[1], a[NR]}'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "## metadata, warm (large image: $(find "$WORK/large-bundle/rootfs" | wc -l) paths)"
P1=$(free_port)
mount_image "$REGISTRY/large:large" "$WORK/mnt-large" "$WORK/root-large" "$P1"
find "$WORK/mnt-large" -type f >/dev/null; ls -lR "$WORK/mnt-large" >/dev/null
find "$WORK/large-bundle/rootfs" -type f >/dev/null; ls -lR "$WORK/large-bundle/rootfs" >/dev/null
for what in "find -type f" "ls -lR"; do
  declare -a tm=() td=()
  for r in $(seq "$RUNS"); do
    if [[ $what == find* ]]; then
      tm+=("$(timeit find "$WORK/mnt-large" -type f)"); td+=("$(timeit find "$WORK/large-bundle/rootfs" -type f)")
    else
      tm+=("$(timeit ls -lR "$WORK/mnt-large")"); td+=("$(timeit ls -lR "$WORK/large-bundle/rootfs")")
    fi
  done
  echo "| $what | clip mount $(echo "${tm[@]}" | stats) | local disk $(echo "${td[@]}" | stats) |"
done
unmount_image

echo "## sequential read of a 128 MiB file"
FILE=data/big.bin
SIZE=$(stat -c %s "$WORK/big-bundle/rootfs/$FILE")
declare -a cold=() warm=() hot=() disk=() pcache=() creg=()
for r in $(seq "$RUNS"); do
  P2=$(free_port)
  rm -rf "$WORK/root-big"
  mount_image "$REGISTRY/big:v1" "$WORK/mnt-big" "$WORK/root-big" "$P2"
  drop; cold+=("$(timeit cat "$WORK/mnt-big/$FILE")"); creg+=("$(registry_bytes "$P2")")
  drop; warm+=("$(timeit cat "$WORK/mnt-big/$FILE")")
  hot+=("$(timeit cat "$WORK/mnt-big/$FILE")")
  unmount_image
  drop; disk+=("$(timeit cat "$WORK/big-bundle/rootfs/$FILE")")
  pcache+=("$(timeit cat "$WORK/big-bundle/rootfs/$FILE")")
done
mbps() { echo "$SIZE / $(echo "$1" | awk '{print $1}') / 1000000" | bc -l | xargs printf '%.0f MB/s'; }
for name in cold warm hot disk pcache; do
  declare -n arr=$name
  med=$(echo "${arr[@]}" | tr ' ' '\n' | grep -v '^$' | median)
  case $name in
    cold) label="clip, cold (empty cache, from the registry)";;
    warm) label="clip, warm (clip cache; kernel page cache dropped)";;
    hot) label="clip, hot (kernel page cache kept: FOPEN_KEEP_CACHE)";;
    disk) label="local disk (page cache dropped)";;
    pcache) label="local disk, page cache";;
  esac
  echo "| $label | $(echo "${arr[@]}" | stats) | $(mbps "$med") |"
done
echo "cold registry bytes per run: ${creg[*]} (file: $SIZE bytes)"
