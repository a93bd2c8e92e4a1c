#!/usr/bin/env bash
# Eager pulls: `clip pull --full` (every lazy layer fetched whole before the pull returns:
# parallel range requests, each run inflated from its own checkpoint) against containerd's own
# `ctr images pull` with overlayfs (download, then unpack layer by layer), on the large test
# image, each on a fresh node with the page cache dropped, then the same container on the node
# (`tar cf - /usr | wc -c`, every byte read) to show what the pull bought.
#
# Links: loopback, and shaped (the registry in a network namespace behind `tc tbf` at 100
# Mbit/s each way, no added delay: a pull is bandwidth-bound).
#
# Usage (root; release build; large image built): scripts/bench/eager.sh [RUNS]
#   CLIP_BENCH_LINKS="loopback": links to run (default: loopback shaped)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
LAYOUT=${CLIP_LARGE_IMAGE:-/var/cache/clip-test-images/large}
[[ -x $CLIP ]] || { echo "build first: cargo build --release" >&2; exit 1; }
[[ -d $LAYOUT ]] || { echo "build the large image first: bash scripts/build-large-image.sh" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/clip-eager.XXXXXX)
NS="clipeager$$" VETH="cev$$"
PIDS=()
cleanup() {
  stop_node "$WORK/node" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "${REGISTRY_PID:-}" 2>/dev/null || true
  stop_shaped "$NS" "$VETH"
  rm -rf "$WORK"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "==> registry, image, published index" >&2
start_registry "$WORK/registry"
push_layout "$LAYOUT" large large
"$CLIP" --root "$WORK/publisher" index --push "$REGISTRY/large:large" >/dev/null 2>&1
declare -A HOST=([loopback]=$REGISTRY)
LINKS=(${CLIP_BENCH_LINKS:-loopback shaped})
if [[ " ${LINKS[*]} " == *" shaped "* ]]; then
  shaped_registry "$WORK/registry" "$NS" "$VETH" 10.232.0
  PIDS+=("$SHAPED_PID")
  HOST[shaped]=$SHAPED_HOST
fi

# once LINK MODE -> PULL_S RUN_S
once() {
  local link=$1 mode=$2 img="${HOST[$1]}/large:large" s p e
  stop_node "$WORK/node" 2>/dev/null || true
  rm -rf "$WORK/node"
  start_node "$WORK/node" --insecure-registry "${HOST[$link]}"
  drop
  s=$(now)
  case $mode in
    overlayfs) $NODE_CTR images pull --plain-http --snapshotter overlayfs "$img" >/dev/null ;;
    clip-full) "$CLIP" --root "$WORK/node/clip" --insecure-registry "${HOST[$link]}" pull --full "$img" --address "$WORK/node/containerd.sock" 2>/dev/null ;;
  esac
  p=$(now)
  local sn=overlayfs; [[ $mode == clip-full ]] && sn=clip
  $NODE_CTR run --rm --snapshotter "$sn" --runc-root "$WORK/node/runc" --fifo-dir "$WORK/node/fifo" "$img" c1 sh -c 'tar cf - /usr | wc -c' >/dev/null 2>&1
  e=$(now)
  PULL_S=$(echo "$p - $s" | bc); RUN_S=$(echo "$e - $p" | bc)
  stop_node "$WORK/node"
}

echo "| link | mode | pull (median of $RUNS) | then tar of /usr | pull / overlayfs's |"
echo "|---|---|---|---|---|"
for link in "${LINKS[@]}"; do
  declare -A PM=()
  for mode in overlayfs clip-full; do
    pulls=() runs=()
    for r in $(seq "$RUNS"); do
      once "$link" "$mode"
      pulls+=("$PULL_S"); runs+=("$RUN_S")
      echo "  $link $mode run $r: pull ${PULL_S}s, tar ${RUN_S}s" >&2
    done
    PM[$mode]=$(printf '%s\n' "${pulls[@]}" | median)
    rm_=$(printf '%s\n' "${runs[@]}" | median)
    ratio=$(awk -v a="${PM[$mode]}" -v b="${PM[overlayfs]}" 'BEGIN {printf "%.2f", a / b}')
    printf '| %s | %s | %.2f s | %.2f s | %s |\n' "$link" "$mode" "${PM[$mode]}" "$rm_" "$ratio"
  done
done
