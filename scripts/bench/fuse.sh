#!/usr/bin/env bash
# FUSE benchmarks: clip's merged mount vs the same image extracted to local disk (umoci unpack).
#   1. metadata, warm: `find -type f | wc -l` and `ls -lR` over the large image
#   2. sequential read of a 128 MiB file: cold (empty clip cache, registry bytes reported),
#      warm from clip's cache (kernel page cache dropped), hot (kernel page cache kept), each
#      through the daemon and with FUSE passthrough, vs local disk (page cache dropped) and
#      local page cache
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

mount_image() { # IMAGE DIR ROOT METRICS_PORT [MOUNT OPTIONS...]
  local image=$1 dir=$2 root=$3 port=$4; shift 4
  mkdir -p "$dir"
  "$CLIP" --root "$root" index "$image" >/dev/null
  "$CLIP" --root "$root" --metrics-address "127.0.0.1:$port" mount "$image" "$dir" "$@" 2>"$root.log" &
  MPID=$!
  for _ in $(seq 200); do mountpoint -q "$dir" && return 0; sleep 0.05; done
  echo "mount failed:" >&2; cat "$root.log" >&2; return 1
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

FILE=data/big.bin
SIZE=$(stat -c %s "$WORK/big-bundle/rootfs/$FILE")
mbps() { echo "$SIZE / $(echo "$1" | awk '{print $1}') / 1000000" | bc -l | xargs printf '%.0f MB/s'; }
row() { # LABEL TIMES...
  local label=$1; shift
  local med; med=$(echo "$@" | tr ' ' '\n' | grep -v '^$' | median)
  echo "| $label | $(echo "$@" | stats) | $(mbps "$med") |"
}
# Waits until the mount's background copy of the file for passthrough is in place.
wait_copy() { # ROOT
  for _ in $(seq 600); do
    [[ -n $(find "$1/cache/files" -maxdepth 1 -type f ! -name 'new.*' 2>/dev/null) ]] && return 0
    sleep 0.05
  done
  echo "no passthrough copy appeared under $1/cache/files" >&2; return 1
}

echo "## sequential read of a 128 MiB file ($SIZE bytes)"
declare -a cold=() warm=() hot=() pfirst=() pwarm=() phot=() disk=() pcache=() creg=() rand=() prand=() drand=()
# 20,000 reads of 4 KiB at random aligned offsets (fixed seed), page cache dropped first.
randread() {
  python3 - "$1" <<'PY'
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
rng = random.Random(42)
offs = [rng.randrange(0, size // 4096) * 4096 for _ in range(20000)]
t = time.monotonic()
for o in offs:
    assert len(os.pread(fd, 4096, o)) == 4096
print(f"{time.monotonic() - t:.4f}")
PY
}
for r in $(seq "$RUNS"); do
  # Through the daemon: passthrough off.
  P2=$(free_port)
  rm -rf "$WORK/root-big"
  mount_image "$REGISTRY/big:v1" "$WORK/mnt-big" "$WORK/root-big" "$P2" --passthrough-cap 0
  drop; cold+=("$(timeit cat "$WORK/mnt-big/$FILE")"); creg+=("$(registry_bytes "$P2")")
  drop; warm+=("$(timeit cat "$WORK/mnt-big/$FILE")")
  hot+=("$(timeit cat "$WORK/mnt-big/$FILE")")
  drop; rand+=("$(randread "$WORK/mnt-big/$FILE")")
  unmount_image
  # Passthrough: the first (cold) read fills the disk tier, closing the file starts the copy,
  # later opens are handed to the kernel.
  P3=$(free_port)
  rm -rf "$WORK/root-big"
  mount_image "$REGISTRY/big:v1" "$WORK/mnt-big" "$WORK/root-big" "$P3"
  cat "$WORK/mnt-big/$FILE" >/dev/null
  wait_copy "$WORK/root-big"
  sync; sleep 5  # let the copy's writeback and journal commit settle before timing
  drop; pfirst+=("$(timeit cat "$WORK/mnt-big/$FILE")")
  drop; pwarm+=("$(timeit cat "$WORK/mnt-big/$FILE")")
  phot+=("$(timeit cat "$WORK/mnt-big/$FILE")")
  drop; prand+=("$(randread "$WORK/mnt-big/$FILE")")
  after=$(registry_bytes "$P3")
  unmount_image
  drop; disk+=("$(timeit cat "$WORK/big-bundle/rootfs/$FILE")")
  pcache+=("$(timeit cat "$WORK/big-bundle/rootfs/$FILE")")
  drop; drand+=("$(randread "$WORK/big-bundle/rootfs/$FILE")")
done
echo "| read | time, median (min-max) | throughput |"
echo "|---|---|---|"
row "clip, cold (empty cache, from the registry)" "${cold[@]}"
row "clip, warm through the daemon (clip cache; kernel page cache dropped)" "${warm[@]}"
row "clip, hot through the daemon (kernel page cache kept: FOPEN_KEEP_CACHE)" "${hot[@]}"
row "clip, passthrough, first open after the copy was written (page cache dropped)" "${pfirst[@]}"
row "clip, warm with passthrough (local copy; page cache dropped)" "${pwarm[@]}"
row "clip, hot with passthrough (page cache of the local copy)" "${phot[@]}"
row "local disk (page cache dropped)" "${disk[@]}"
row "local disk, page cache" "${pcache[@]}"
echo
echo "| 20,000 random 4 KiB reads (page cache dropped) | time, median (min-max) | reads/s |"
echo "|---|---|---|"
rrow() { local med; med=$(echo "${@:2}" | tr ' ' '\n' | grep -v '^$' | median); echo "| $1 | $(echo "${@:2}" | stats) | $(echo "20000 / $med" | bc) |"; }
rrow "clip through the daemon (spans in clip's cache)" "${rand[@]}"
rrow "clip with passthrough (local copy)" "${prand[@]}"
rrow "local disk" "${drand[@]}"
echo "cold registry bytes per run: ${creg[*]} (file: $SIZE bytes); passthrough mount, total: $after"
