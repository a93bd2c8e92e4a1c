#!/usr/bin/env bash
# One large file read start to end (a model's weights): pull + `dd if=/data/gig.bin
# of=/dev/null bs=1M` in a container, cold, each mode on a fresh node (own containerd, own snapshotter state, page cache
# dropped), side by side:
#   overlayfs  containerd's full pull + unpack, then the run (the baseline)
#   clip       lazy pull (published index); the read switches the layer to bulk streaming
#   soci       SOCI snapshotter 0.4.1 (the lazy peer), its own index (`soci create`, pushed)
# Image: busybox + one 1 GiB file (half incompressible, half text, in 1 MiB blocks; about
# 512 MiB gzipped), built once by mkimage.py into $CLIP_IMAGE_CACHE/gig.
# Links: loopback, and shaped (100 Mbit/s tbf each way + 5 ms each way, as coldstart.sh).
# Reports time, registry bytes and requests, the rate the file's compressed bytes came at
# (shaped: against 100 Mbit/s, the link rate) and its uncompressed rate (loopback: beside
# `gzip -dc` of the same layer on one core, and the layer inflated from clip's checkpoints on
# every core by `clip pull --full`).
# Usage (root; release build): scripts/bench/bigfile.sh [RUNS]
#   CLIP_BENCH_MODES="overlayfs clip" to skip SOCI; CLIP_BENCH_LINKS="shaped" for one link.
source "$(dirname "$0")/lib.sh"
RUNS=${1:-1}
CACHE_DIR=${CLIP_IMAGE_CACHE:-/var/cache/clip-test-images}
LAYOUT=$CACHE_DIR/gig
[[ -x $CLIP ]] || { echo "build first: cargo build --release" >&2; exit 1; }
if [[ ! -f $LAYOUT/index.json ]]; then
  echo "==> building the 1 GiB-file image into $LAYOUT (once; about a minute)"
  rm -rf "$LAYOUT.new"
  python3 "$ROOT_DIR/scripts/mkimage.py" layout "$LAYOUT.new" v1 gen:busybox gen:gigfile
  mv "$LAYOUT.new" "$LAYOUT"
fi
WORK=$(mktemp -d /var/tmp/clip-bigfile.XXXXXX)
NS="clipbig$$" VETH="cbg$$"
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
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
FILE_BYTES=$((1 << 30))
# busybox dd, 1 MiB reads; its record count is checked. Not `cat | wc -c`: busybox wc counts
# about 90 MB/s here, slower than the file can come.
WORKLOAD='dd if=/data/gig.bin of=/dev/null bs=1M 2>&1 | head -1'
WANT="$((FILE_BYTES >> 20))+0 records in"

echo "==> registry, image, published index"
start_registry "$WORK/registry"
push_layout "$LAYOUT" v1 gig
"$CLIP" --root "$WORK/publisher" index --push "$REGISTRY/gig:v1" >/dev/null 2>&1
IMAGE_BYTES=$("$CLIP" --root "$WORK/publisher" inspect "$REGISTRY/gig:v1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["compressed_bytes"])')
BLOB=$(python3 - "$LAYOUT" <<'PY'
import json, sys
d = sys.argv[1]
idx = json.load(open(f"{d}/index.json"))
m = json.load(open(f"{d}/blobs/sha256/" + idx["manifests"][0]["digest"].split(":")[1]))
big = max(m["layers"], key=lambda l: l["size"])
print(f"{d}/blobs/sha256/" + big["digest"].split(":")[1])
PY
)
echo "image: $(mib "$IMAGE_BYTES") compressed; the file's layer: $(mib "$(stat -c %s "$BLOB")")"

declare -A LINK_HOST LINK_STATS
LINKS=(loopback shaped)
[[ -n ${CLIP_BENCH_LINKS:-} ]] && read -r -a LINKS <<<"$CLIP_BENCH_LINKS"
bench_proxy loopback "$REGISTRY" 0
LINK_HOST[loopback]=$PROXY LINK_STATS[loopback]=$STATS
if [[ " ${LINKS[*]} " == *" shaped "* ]]; then
  shaped_registry "$WORK/registry" "$NS" "$VETH" 10.232.0
  PIDS+=("$SHAPED_PID")
  bench_proxy shaped "$SHAPED_HOST" 5
  LINK_HOST[shaped]=$PROXY LINK_STATS[shaped]=$STATS
fi
MODES=${CLIP_BENCH_MODES:-"overlayfs clip soci"}
if [[ " $MODES " == *" soci "* ]]; then
  echo "==> SOCI peer: its index for the image (soci create + push)"
  soci_index "$LAYOUT" v1 gig-soci
fi

# run_once LINK MODE -> SECS BYTES REQS OUT
run_once() {
  local link=$1 mode=$2 dir=$WORK/node repo=gig s e b0 q0
  [[ $mode == soci ]] && repo=gig-soci
  local img="${LINK_HOST[$link]}/$repo:v1" sf="${LINK_STATS[$link]}"
  rm -rf "$dir"; mkdir -p "$dir"
  if [[ $mode == soci ]]; then start_soci_node "$dir"; else start_node "$dir"; fi
  drop
  b0=$(cat "$sf"); q0=$(cat "$sf.req"); s=$(now)
  case $mode in
    overlayfs) $NODE_CTR images pull --plain-http --snapshotter overlayfs "$img" >/dev/null ;;
    soci) "$SOCI_BIN/soci" --address "$dir/containerd.sock" image rpull --plain-http --soci-index-digest "$SOCI_INDEX" "$img" >/dev/null 2>&1 ;;
    clip) "$CLIP" --root "$dir/clip" pull "$img" --address "$dir/containerd.sock" 2>/dev/null ;;
  esac
  OUT=$($NODE_CTR run --rm --snapshotter "$mode" --runc-root "$dir/runc" --fifo-dir "$dir/fifo" "$img" c1 sh -c "$WORKLOAD")
  e=$(now); sleep 0.3
  SECS=$(echo "$e - $s" | bc); BYTES=$(( $(cat "$sf") - b0 )); REQS=$(( $(cat "$sf.req") - q0 ))
  [[ $OUT == "$WANT" ]] || { echo "$mode on $link: dd said \"$OUT\", not \"$WANT\"" >&2; exit 1; }
  stop_node "$dir"
}

ROWS=()
declare -A MED
for link in "${LINKS[@]}"; do
  for mode in $MODES; do
    declare -a t=() by=() rq=()
    for r in $(seq "$RUNS"); do
      run_once "$link" "$mode"
      t+=("$SECS"); by+=("$BYTES"); rq+=("$REQS")
      echo "  $link | $mode | run $r: ${SECS}s, $(mib "$BYTES") in $REQS blob requests" >&2
    done
    m=$(printf '%s\n' "${t[@]}" | median); b=$(printf '%s\n' "${by[@]}" | median); q=$(printf '%s\n' "${rq[@]}" | median)
    MED[$link$mode]=$m
    rate=$(awk -v b="$b" -v t="$m" 'BEGIN {printf "%.1f", b * 8 / t / 1e6}')
    file=$(awk -v t="$m" -v f="$FILE_BYTES" 'BEGIN {printf "%.0f", f / t / 1e6}')
    link_pct=$([[ $link == shaped ]] && awk -v r="$rate" 'BEGIN {printf "%.0f %%", r}' || echo -)
    ROWS+=("| $link | $mode | $(printf %.2f "$m") s | $(mib "${b%.*}") | ${q%.*} | $rate Mbit/s | $link_pct | $file MB/s |")
  done
done

echo "==> inflate rates of the file's layer on this machine"
s=$(now); gzip -dc <"$BLOB" >/dev/null; e=$(now)
GZ=$(echo "$e - $s" | bc)
d="$WORK/node"; rm -rf "$d"; mkdir -p "$d"; start_node "$d"; drop
s=$(now); "$CLIP" --root "$d/clip" pull --full "${LINK_HOST[loopback]}/gig:v1" --address "$d/containerd.sock" >/dev/null 2>&1; e=$(now)
FULL=$(echo "$e - $s" | bc)
stop_node "$d"
RAW=$(gzip -l "$BLOB" | awk 'NR==2 {print $2}')
echo
echo "| link | mode | pull + read 1 GiB | registry sent | blob requests | compressed bytes' rate | of the 100 Mbit/s link | file rate |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
for link in "${LINKS[@]}"; do
  base=${MED[${link}overlayfs]:-}
  for mode in $MODES; do
    [[ $mode == overlayfs || -z $base ]] && continue
    echo "$link: $mode / overlayfs = $(awk -v a="${MED[$link$mode]}" -v b="$base" 'BEGIN {printf "%.2f", a / b}')"
  done
done
echo "floor, shaped: $(mib "$IMAGE_BYTES") over 100 Mbit/s = $(awk -v b="$IMAGE_BYTES" 'BEGIN {printf "%.1f", b / 12.5e6}') s"
echo "inflate on this machine: gzip -dc of the layer (one core) $(printf %.2f "$GZ") s = $(awk -v r="${RAW:-0}" -v t="$GZ" 'BEGIN {printf "%.0f", r / t / 1e6}') MB/s; clip pull --full on loopback (checkpoints, every core) $(printf %.2f "$FULL") s = $(awk -v r="${RAW:-0}" -v t="$FULL" 'BEGIN {printf "%.0f", r / t / 1e6}') MB/s"
