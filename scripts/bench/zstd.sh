#!/usr/bin/env bash
# Cold starts of the large test image in three layer formats, side by side on one node type:
#   gzip          clip lazy (index published with `clip index --push`)
#   zstd:chunked  clip lazy (indexed on the node from each layer's table of contents; converted
#                 with stargz-snapshotter 0.14.3's `ctr-remote image convert --zstdchunked`,
#                 Debian's development suite)
#   zstd          plain zstd (skopeo --dest-compress-format zstd, 8 MiB windows): clip lazy,
#                 its checkpoint index published with `clip index --push`
# and containerd's overlayfs full pulls of the gzip and the zstd image as the baselines. Each start is on a fresh
# node (own containerd and clip root, page cache dropped), from the pull's start to the
# container's output; a proxy counts the bytes and blob requests the registry serves.
#
# Links: loopback, and shaped (the registry in a network namespace behind `tc tbf` at 100 Mbit/s
# each way, plus the proxy adding 5 ms each way: ~10 ms RTT).
#
# Usage (root; release build; large image built): scripts/bench/zstd.sh [RUNS]
#   CLIP_BENCH_LINKS="loopback": links to run (default: loopback shaped)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-1}
LAYOUT=${CLIP_LARGE_IMAGE:-/var/cache/clip-test-images/large}
[[ -x $CLIP ]] || { echo "build first: cargo build --release" >&2; exit 1; }
[[ -d $LAYOUT ]] || { echo "build the large image first: bash scripts/build-large-image.sh" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/clip-zstd.XXXXXX)
NS="clipzstd$$" VETH="czv$$"
PIDS=()
cleanup() {
  stop_node "$WORK/node" 2>/dev/null || true
  [[ -n ${CONV_PID:-} ]] && kill "$CONV_PID" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "${REGISTRY_PID:-}" 2>/dev/null || true
  stop_shaped "$NS" "$VETH"
  rm -rf "$WORK"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "==> registry, the gzip image and its published index" >&2
start_registry "$WORK/registry"
push_layout "$LAYOUT" large large
"$CLIP" --root "$WORK/publisher" index --push "$REGISTRY/large:large" >/dev/null 2>&1

echo "==> zstd:chunked (ctr-remote convert) and plain zstd (skopeo)" >&2
CTR_REMOTE=$(bash "$ROOT_DIR/scripts/debian-tool.sh" stargz-snapshotter 0.14.3-7 usr/bin/ctr-remote)/usr/bin/ctr-remote
mkdir -p "$WORK/conv"
cat >"$WORK/conv/config.toml" <<TOML
version = 2
root = "$WORK/conv/root"
state = "$WORK/conv/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$WORK/conv/containerd.sock"
TOML
containerd --config "$WORK/conv/config.toml" 2>"$WORK/conv/log" &
CONV_PID=$!
CR="$CTR_REMOTE -a $WORK/conv/containerd.sock"
for _ in $(seq 200); do $CR version >/dev/null 2>&1 && break; sleep 0.05; done
$CR images pull --plain-http "$REGISTRY/large:large" >/dev/null
t0=$(now)
$CR image convert --oci --zstdchunked "$REGISTRY/large:large" "$REGISTRY/large:zc" >/dev/null
echo "   converted in $(echo "$(now) - $t0" | bc) s" >&2
$CR images push --plain-http "$REGISTRY/large:zc" >/dev/null
kill "$CONV_PID"; wait "$CONV_PID" 2>/dev/null || true; CONV_PID=
# skopeo recompresses only uncompressed layers, and pushing it would send the gzip blobs it knows
# of: decompress to a dir:, compress to a layout, push that as it is.
skopeo copy --quiet --dest-decompress "oci:$LAYOUT:large" "dir:$WORK/plain"
skopeo copy --quiet --format oci --dest-compress --dest-compress-format zstd "dir:$WORK/plain" "oci:$WORK/zstd:large"
rm -rf "$WORK/plain"
skopeo copy --quiet --preserve-digests --dest-tls-verify=false "oci:$WORK/zstd:large" "docker://$REGISTRY/large:zstd"
t0=$(now)
"$CLIP" --root "$WORK/publisher" index --push "$REGISTRY/large:zstd" >/dev/null 2>&1
echo "   plain zstd indexed (checkpoints) and published in $(echo "$(now) - $t0" | bc) s" >&2
bytes_of() { # TAG: the layers' bytes from the manifest
  curl -s -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://$REGISTRY/v2/large/manifests/$1" |
    python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))'
}
declare -A SIZE=([large]=$(bytes_of large) [zc]=$(bytes_of zc) [zstd]=$(bytes_of zstd))
echo "   layer bytes: gzip ${SIZE[large]}, zstd:chunked ${SIZE[zc]}, zstd ${SIZE[zstd]}" >&2

declare -A HOST STATSF
LINKS=(${CLIP_BENCH_LINKS:-loopback shaped})
bench_proxy loopback "$REGISTRY" 0; HOST[loopback]=$PROXY STATSF[loopback]=$STATS
if [[ " ${LINKS[*]} " == *" shaped "* ]]; then
  shaped_registry "$WORK/registry" "$NS" "$VETH" 10.233.0
  PIDS+=("$SHAPED_PID")
  bench_proxy shaped "$SHAPED_HOST" 5; HOST[shaped]=$PROXY STATSF[shaped]=$STATS
fi

WORKLOADS=("print(1)" "import numpy")
# once LINK MODE WORKLOAD -> SECS BYTES REQS
once() {
  local link=$1 mode=$2 code=$3 tag sn=clip s b0 r0
  case $mode in
    overlayfs) tag=large sn=overlayfs ;;
    overlayfs-zstd) tag=zstd sn=overlayfs ;;
    gzip) tag=large ;;
    zstd:chunked) tag=zc ;;
    zstd) tag=zstd ;;
  esac
  local img="${HOST[$link]}/large:$tag"
  stop_node "$WORK/node" 2>/dev/null || true
  rm -rf "$WORK/node"
  start_node "$WORK/node" --insecure-registry "${HOST[$link]}"
  drop
  sleep 0.3
  b0=$(cat "${STATSF[$link]}") r0=$(cat "${STATSF[$link]}.req")
  s=$(now)
  if [[ $sn == overlayfs ]]; then
    $NODE_CTR images pull --plain-http --snapshotter overlayfs "$img" >/dev/null
  else
    "$CLIP" --root "$WORK/node/clip" --insecure-registry "${HOST[$link]}" pull "$img" --address "$WORK/node/containerd.sock" 2>/dev/null
  fi
  $NODE_CTR run --rm --snapshotter "$sn" --runc-root "$WORK/node/runc" --fifo-dir "$WORK/node/fifo" "$img" c1 python3 -c "$code" >/dev/null 2>&1
  SECS=$(echo "$(now) - $s" | bc)
  sleep 0.3
  BYTES=$(( $(cat "${STATSF[$link]}") - b0 )) REQS=$(( $(cat "${STATSF[$link]}.req") - r0 ))
  stop_node "$WORK/node"
}

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "| link | workload | format | time (median of $RUNS) | registry bytes | blob requests | time / overlayfs |"
echo "|---|---|---|---|---|---|---|"
for link in "${LINKS[@]}"; do
  for code in "${WORKLOADS[@]}"; do
    base=""
    for mode in overlayfs gzip zstd:chunked overlayfs-zstd zstd; do
      ts=() bs=() rs=()
      for r in $(seq "$RUNS"); do
        once "$link" "$mode" "$code"
        ts+=("$SECS") bs+=("$BYTES") rs+=("$REQS")
        echo "  $link $code $mode run $r: ${SECS}s, $BYTES bytes, $REQS requests" >&2
      done
      t=$(printf '%s\n' "${ts[@]}" | median)
      b=$(printf '%s\n' "${bs[@]}" | median)
      q=$(printf '%s\n' "${rs[@]}" | median)
      [[ -z $base ]] && base=$t
      label=$mode; [[ $mode == overlayfs ]] && label="overlayfs (gzip, full pull)"
      [[ $mode == overlayfs-zstd ]] && label="overlayfs (zstd, full pull)"
      [[ $mode == zstd ]] && label="zstd (clip, published checkpoints)"
      [[ $mode == gzip ]] && label="gzip (clip, published index)"
      [[ $mode == zstd:chunked ]] && label="zstd:chunked (clip, TOC)"
      printf '| %s | `%s` | %s | %.2f s | %s | %.0f | %.2f |\n' "$link" "$code" "$label" "$t" "$(mib "$b")" "$q" \
        "$(awk -v a="$t" -v b="$base" 'BEGIN {print a / b}')"
    done
  done
done
