#!/usr/bin/env bash
# Container start, side by side: containerd's overlayfs snapshotter (full pull + unpack) vs clip
# (lazy pull through the clip snapshotter), on the large test image, each on a fresh node
# (own containerd, own clip root, kernel page cache dropped), measured from the pull's start to the
# container's output. Reports time, the bytes the registry sent (counted by a proxy in front of
# it), warm starts (a new container on the same node, page cache dropped), a second node sharing
# the first one's Redis tier, daemon RSS and cache size.
#
# Links: loopback, and "shaped": the registry in its own network namespace behind a veth pair
# with `tc tbf` at 100 Mbit/s each way, plus a userspace proxy adding 5 ms each way (~10 ms RTT;
# there is no sch_netem here).
#
# Usage (root; release build; large image built):
#   scripts/bench/coldstart.sh [RUNS] [--quick] [--out FILE]
#   --quick: loopback, print(1) only, overlayfs and clip, one run (what the README demo shows)
#   --out FILE: also write the markdown tables to FILE (and FILE.csv for the plot)
#   CLIP_BENCH_WORKLOAD=CODE: the python3 -c code of the first workload (default print(1))
#   CLIP_BENCH_SET=readmost: the read-most workloads instead (a tar of /usr; every .py file of the
#     Python tree read once); "all": both sets. The floor of a read-most workload is also shown as
#     the image's bytes over the link (what a full pull must move).
#   CLIP_BENCH_MODES="clip": modes to run (default "overlayfs clip clip+profile soci stargz"); clip+profile
#     publishes a startup profile of the workload first (`clip profile`, on its own copy of the
#     image) so the node prefetches what the workload reads; soci is the SOCI snapshotter 0.4.1
#     from Debian's development suite (scripts/bench/peers.sh) with its own index (`soci create`,
#     4 MiB spans, pushed to the registry), pulled with `soci image rpull --soci-index-digest`;
#     stargz is stargz-snapshotter 0.14.3's library with its defaults (scripts/bench/stargz.sh:
#     Debian ships no stargz daemon) on its own eStargz conversion of the image (ctr-remote
#     `image convert --estargz`, no prioritized files), pulled with `ctr-remote images rpull`
#
# Floor: the compressed bytes of the file ranges the workload reads (`clip profile` reports
# them, pro-rated by span) over the link rate (loopback: not limiting), plus the same
# container's warm start. Each row shows time / floor.
#   Trust (docs/security.md): mode "clip" runs under the default (`owner`); "clip/published" and
#     "clip/signed" under those settings (signed: the index artifact signed with a cosign key made
#     for the run, cosign 3.1.1 from Debian's development suite).
#   CLIP_BENCH_CROSS=1: also time a cross-repository first use under the default: a node runs
#     the image from one repository, then the same layers from another repository that
#     published its own index (the node verifies each layer once): time and bytes of that
#     second start, beside the first.
#   CLIP_BENCH_SPAN=SIZE: span size of the published indexes (default: clip index's default)
#   CLIP_BENCH_TRACE=PREFIX: write each proxy's request timeline to PREFIX.<link> (proxy.py)
#   CLIP_BENCH_LINKS="shaped": links to run (default: loopback shaped; --quick: loopback)
#   CLIP_BENCH_EXTRAS=0: skip the shared-Redis and span-size sections (before/after comparisons)
#   CLIP_BENCH_CONFIG=FILE: the clip snapshotter's config file (e.g. to turn a guess off for an
#     A/B comparison in one session)
source "$(dirname "$0")/lib.sh"
RUNS=3 QUICK=0 OUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) QUICK=1; RUNS=1;;
    --out) OUT=$2; shift;;
    *) RUNS=$1;;
  esac
  shift
done
LAYOUT=${CLIP_LARGE_IMAGE:-/var/cache/clip-test-images/large}
[[ -x $CLIP ]] || { echo "build first: cargo build --release" >&2; exit 1; }
[[ -d $LAYOUT ]] || { echo "build the large image first: bash scripts/build-large-image.sh" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/clip-coldstart.XXXXXX)
NS="clipbench$$" VETH="cbv$$"
PIDS=()
cleanup() {
  stop_node "$WORK/node" 2>/dev/null || true
  stop_node "$WORK/node2" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "${REGISTRY_PID:-}" 2>/dev/null || true
  stop_shaped "$NS" "$VETH"
  rm -rf "$WORK"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
stats() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f s (%.2f-%.2f)", m, a[1], a[NR]}'; }
med() { tr ' ' '\n' | grep -v '^$' | median; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

echo "==> registry, image, published index"
start_registry "$WORK/registry"
push_layout "$LAYOUT" large large
SPAN_ARGS=(); [[ -n ${CLIP_BENCH_SPAN:-} ]] && SPAN_ARGS=(--span-size "$CLIP_BENCH_SPAN")
"$CLIP" --root "$WORK/publisher" index "${SPAN_ARGS[@]}" --push "$REGISTRY/large:large" >/dev/null 2>&1
IMAGE_BYTES=$("$CLIP" --root "$WORK/publisher" inspect "$REGISTRY/large:large" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["compressed_bytes"])')
echo "image: $(mib "$IMAGE_BYTES") compressed"


declare -A LINK_HOST LINK_STATS
bench_proxy loopback "$REGISTRY" 0
LINK_HOST[loopback]=$PROXY LINK_STATS[loopback]=$STATS
LINKS=(loopback)
if [[ $QUICK == 0 ]]; then
  echo "==> shaped link: registry in netns $NS, tbf 100 Mbit/s each way, +5 ms each way"
  # A second docker-registry serving the same storage, inside the namespace.
  shaped_registry "$WORK/registry" "$NS" "$VETH" 10.231.0
  PIDS+=("$SHAPED_PID")
  bench_proxy shaped "$SHAPED_HOST" 5
  LINK_HOST[shaped]=$PROXY LINK_STATS[shaped]=$STATS
  LINKS+=(shaped)
fi

[[ -n ${CLIP_BENCH_LINKS:-} ]] && read -r -a LINKS <<<"$CLIP_BENCH_LINKS"
# Read-most workloads (CLIP_BENCH_SET=readmost): a tar of /usr (reads nearly every byte of the
# image, in directory order), and a JVM-like start that opens every .py file of the Python
# tree once (thousands of small files, in directory order).
TAR_USR='import subprocess; print(subprocess.run("tar cf - /usr | wc -c", shell=True, capture_output=True, text=True).stdout.strip())'
PY_FILES=$'import os\nn = k = 0\nfor d, _, fs in os.walk("/usr/lib/python3"):\n    for f in fs:\n        if f.endswith(".py"):\n            n += len(open(os.path.join(d, f), "rb").read()); k += 1\nprint(k, n)'
case ${CLIP_BENCH_SET:-partial} in
  partial)
    WORKLOADS=("${CLIP_BENCH_WORKLOAD:-print(1)}")
    [[ $QUICK == 0 ]] && WORKLOADS+=("import numpy; print(numpy.__version__)") ;;
  readmost) WORKLOADS=("$TAR_USR" "$PY_FILES") ;;
  all) WORKLOADS=("print(1)" "import numpy; print(numpy.__version__)" "$TAR_USR" "$PY_FILES") ;;
  *) echo "CLIP_BENCH_SET: partial, readmost or all" >&2; exit 1 ;;
esac
# A workload's name in the tables.
wname() {
  case $1 in
    "$TAR_USR") echo "tar cf - /usr | wc -c" ;;
    "$PY_FILES") echo "read every .py under /usr/lib/python3" ;;
    *) echo "$1" ;;
  esac
}
CSV="$WORK/coldstart.csv"
echo "link,workload,mode,seconds" >"$CSV"
ROWS=()

# start_once LINK MODE WORKLOAD DIR [SNAPSHOTTER ARGS] -> COLD_S COLD_B WARM_S RSS CACHE OUTPUT
start_once() {
  local link=$1 mode=$2 w=$3 dir=$4; shift 4
  local img="${LINK_HOST[$link]}/${REPO:-large}:large" sf="${LINK_STATS[$link]}" sn=${mode%%+*} b0 s e
  sn=${sn%%/*}
  stop_node "$dir" 2>/dev/null || true
  rm -rf "$dir"; mkdir -p "$dir"
  case $mode in
    soci) start_soci_node "$dir" ;;
    stargz) start_stargz_node "$dir" ;;
    *) start_node "$dir" "$@" ;;
  esac
  drop
  b0=$(cat "$sf"); q0=$(cat "$sf.req")
  s=$(now)
  if [[ $mode == overlayfs ]]; then
    $NODE_CTR images pull --plain-http --snapshotter overlayfs "$img" >/dev/null
  elif [[ $mode == soci ]]; then
    "$SOCI_BIN/soci" --address "$dir/containerd.sock" image rpull --plain-http --soci-index-digest "$SOCI_INDEX" "$img" >/dev/null 2>&1
  elif [[ $mode == stargz ]]; then
    "$STARGZ_BIN/ctr-remote" -a "$dir/containerd.sock" images rpull --plain-http "$img" >/dev/null 2>&1
  else
    "$CLIP" --root "$dir/clip" pull "$img" --address "$dir/containerd.sock" 2>/dev/null
  fi
  OUTPUT=$($NODE_CTR run --rm --snapshotter "$sn" --runc-root "$dir/runc" --fifo-dir "$dir/fifo" "$img" c1 python3 -c "$w")
  e=$(now)
  sleep 0.3
  COLD_S=$(echo "$e - $s" | bc); COLD_B=$(( $(cat "$sf") - b0 )); COLD_Q=$(( $(cat "$sf.req") - q0 ))
  drop
  s=$(now)
  $NODE_CTR run --rm --snapshotter "$sn" --runc-root "$dir/runc" --fifo-dir "$dir/fifo" "$img" c2 python3 -c "$w" >/dev/null
  e=$(now)
  WARM_S=$(echo "$e - $s" | bc)
  RSS=$(awk '/^VmHWM/ {print $2 * 1024}' "/proc/$NODE_SNAP_PID/status")
  # -x: not into the snapshotters' FUSE mounts; a node has only one of the two directories.
  CACHE=$({ du -sbx "$dir/clip/cache" "$dir/soci" "$dir/stargz" 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
}

DEFAULT_MODES="overlayfs clip clip+profile soci stargz"
[[ $QUICK == 1 ]] && DEFAULT_MODES="overlayfs clip"
MODES=${CLIP_BENCH_MODES:-$DEFAULT_MODES}
if [[ " $MODES " == *" soci "* ]]; then
  echo "==> SOCI peer: its index for the image (soci create + push)"
  soci_index "$LAYOUT" large large-soci
fi
if [[ " $MODES " == *" stargz "* ]]; then
  echo "==> stargz peer: its eStargz conversion of the image (ctr-remote image convert + push)"
  stargz_image large large large-esgz
fi
if [[ " $MODES " == *" clip/signed "* ]]; then
  echo "==> cosign: a key for the run, the index artifact of large:large signed"
  COSIGN=$(bash "$ROOT_DIR/scripts/debian-tool.sh" cosign 3.1.1-2 usr/bin/cosign | tail -1)/usr/bin/cosign
  (cd "$WORK" && COSIGN_PASSWORD="" "$COSIGN" generate-key-pair >/dev/null 2>&1)
  ARTIFACT=$("$CLIP" --root "$WORK/publisher" index --push --json "$REGISTRY/large:large" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["artifact"])')
  COSIGN_PASSWORD="" "$COSIGN" sign --key "$WORK/cosign.key" --use-signing-config=false --tlog-upload=false \
    --allow-insecure-registry --yes "$REGISTRY/large@$ARTIFACT" >"$WORK/cosign.log" 2>&1 \
    || { cat "$WORK/cosign.log" >&2; exit 1; }
fi
# The snapshotter's flags for a mode.
mode_args() {
  case $1 in
    clip/published) echo "--trust published" ;;
    clip/signed) echo "--trust signed --trust-key $WORK/cosign.pub" ;;
  esac
}
# Per workload: its own copy of the image with a published profile, and its floor bytes.
declare -A PROF_REPO FLOOR_B
k=0
for w in "${WORKLOADS[@]}"; do
  k=$((k + 1))
  repo="large-prof$k"
  push_layout "$LAYOUT" large "$repo"
  "$CLIP" --root "$WORK/publisher" index "${SPAN_ARGS[@]}" --push "$REGISTRY/$repo:large" >/dev/null 2>&1
  line=$("$CLIP" --root "$WORK/publisher" profile "$REGISTRY/$repo:large" -- python3 -c "$w" 2>&1 >/dev/null | grep '^read: ')
  PROF_REPO[$w]=$repo
  FLOOR_B[$w]=$(echo "$line" | awk '{print $(NF-2)}')
  echo "profile of \`$(wname "$w")\`: $line" >&2
done
declare -A MED
# link rate in bytes/s (0: not limiting)
declare -A RATE=([loopback]=0 [shaped]=12500000)

for link in "${LINKS[@]}"; do
  for w in "${WORKLOADS[@]}"; do
    for mode in $MODES; do
      case $mode in
        clip+profile) REPO=${PROF_REPO[$w]} ;;
        soci) REPO=large-soci ;;
        stargz) REPO=large-esgz ;;
        *) REPO=large ;;
      esac
      declare -a cold=() bytes=() warm=() rss=() cache=() reqs=()
      for r in $(seq "$RUNS"); do
        # shellcheck disable=SC2046
        start_once "$link" "$mode" "$w" "$WORK/node" ${CLIP_BENCH_CONFIG:+--config "$CLIP_BENCH_CONFIG"} $(mode_args "$mode")
        stop_node "$WORK/node"
        cold+=("$COLD_S"); bytes+=("$COLD_B"); warm+=("$WARM_S"); rss+=("$RSS"); cache+=("$CACHE"); reqs+=("$COLD_Q")
        echo "$link,$w,$mode,$COLD_S" >>"$CSV"
        echo "  $link | $(wname "$w") | $mode | run $r: ${COLD_S}s cold, $(mib "$COLD_B") in $COLD_Q blob requests from the registry, ${WARM_S}s warm -> $OUTPUT" >&2
      done
      b=$(echo "${bytes[@]}" | med)
      cm=$(echo "${cold[@]}" | med); wm=$(echo "${warm[@]}" | med)
      MED["$link|$w|$mode"]=$cm
      floor=$(awk -v f="${FLOOR_B[$w]}" -v r="${RATE[$link]}" -v w="$wm" 'BEGIN {printf "%.2f", (r > 0 ? f / r : 0) + w}')
      ratio=$(awk -v c="$cm" -v f="$floor" 'BEGIN {printf "%.1f", c / f}')
      ROWS+=("| $link | \`$(wname "$w")\` | $mode | $(echo "${cold[@]}" | stats) | $floor s | **$ratio** | $(mib "${b%.*}") ($(awk -v b="$b" -v t="$IMAGE_BYTES" 'BEGIN {printf "%.1f", b * 100 / t}') %) | $(echo "${reqs[@]}" | med | cut -d. -f1) | $(echo "${warm[@]}" | stats) | $( [[ $mode != overlayfs ]] && echo "$(mib "$(echo "${rss[@]}" | med | cut -d. -f1)") / $(mib "$(echo "${cache[@]}" | med | cut -d. -f1)")" || echo "-") |")
    done
  done
done
REPO=large
# Each mode against containerd's full pull (overlayfs) and against the image's bytes over the
# link (shaped; what any full pull must move), in the same run.
RATIOS=()
for link in "${LINKS[@]}"; do
  for w in "${WORKLOADS[@]}"; do
    base=${MED["$link|$w|overlayfs"]:-}
    for mode in $MODES; do
      [[ $mode == overlayfs ]] && continue
      m=${MED["$link|$w|$mode"]:-}
      [[ -n $m ]] || continue
      vs=$([[ -n $base ]] && awk -v a="$m" -v b="$base" 'BEGIN {printf "%.2f", a / b}' || echo -)
      img=$([[ ${RATE[$link]} -gt 0 ]] && awk -v a="$m" -v t="$IMAGE_BYTES" -v r="${RATE[$link]}" 'BEGIN {printf "%.2f", a / (t / r)}' || echo -)
      peers=""
      for p in soci stargz; do
        pm=${MED["$link|$w|$p"]:-}
        peers+=" $([[ -n $pm && $mode != "$p" ]] && awk -v a="$m" -v b="$pm" 'BEGIN {printf "%.2f", a / b}' || echo -) |"
      done
      RATIOS+=("| $link | \`$(wname "$w")\` | $mode | $(printf %.2f "$m") s | $([[ -n $base ]] && printf %.2f "$base" || echo -) s | **$vs** | $img |$peers")
    done
  done
done
echo "floor bytes (compressed file ranges read): $(for w in "${WORKLOADS[@]}"; do printf '%s=%s; ' "$(wname "$w")" "$(mib "${FLOOR_B[$w]}")"; done)" >&2

{
  echo "| link | workload | mode | cold start: pull + run to output | floor | time / floor | registry sent (of the image) | blob requests | warm start (new container, page cache dropped) | clip daemon peak RSS / disk cache |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "| link | workload | mode | median | overlayfs (full pull + run) | mode / overlayfs | mode / (image bytes over the link) | mode / soci | mode / stargz |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${RATIOS[@]}"
} | tee "$WORK/table.md"

if [[ ${CLIP_BENCH_CROSS:-0} == 1 ]]; then
  echo
  echo "==> cross-repository first use under the default trust (owner)"
  # The same layers in another repository, with its own published index.
  push_layout "$LAYOUT" large large-other
  "$CLIP" --root "$WORK/publisher-other" index "${SPAN_ARGS[@]}" --push "$REGISTRY/large-other:large" >/dev/null 2>&1
  CROSS_ROWS=()
  w="print(1)"
  for link in "${LINKS[@]}"; do
    for r in $(seq "$RUNS"); do
      dir="$WORK/node"
      REPO=large start_once "$link" clip "$w" "$dir"
      FIRST_S=$COLD_S FIRST_B=$COLD_B
      img="${LINK_HOST[$link]}/large-other:large"; sf="${LINK_STATS[$link]}"
      drop; b0=$(cat "$sf"); q0=$(cat "$sf.req"); s=$(now)
      "$CLIP" --root "$dir/clip" pull "$img" --address "$dir/containerd.sock" 2>/dev/null
      $NODE_CTR run --rm --snapshotter clip --runc-root "$dir/runc" --fifo-dir "$dir/fifo" "$img" c3 python3 -c "$w" >/dev/null
      e=$(now); sleep 0.3
      X_S=$(echo "$e - $s" | bc); X_B=$(( $(cat "$sf") - b0 )); X_Q=$(( $(cat "$sf.req") - q0 ))
      # A warning per layer verified (the daemon logs warnings and errors by default).
      VERIFIED=$(grep -c "indexing it on this node from its own bytes" "$dir/snapshotter.log" || true)
      stop_node "$dir"
      echo "  $link | run $r: first repository ${FIRST_S}s, $(mib "$FIRST_B"); second repository ${X_S}s, $(mib "$X_B") in $X_Q requests, $VERIFIED layer(s) verified" >&2
      CROSS_ROWS+=("| $link | $r | ${FIRST_S} s, $(mib "$FIRST_B") | ${X_S} s | $(mib "$X_B") ($(awk -v b="$X_B" -v t="$IMAGE_BYTES" 'BEGIN {printf "%.0f", b * 100 / t}') %) | $X_Q | $VERIFIED |")
    done
  done
  {
    echo
    echo "| link | run | first repository: cold start, registry sent | second repository, same layers: pull + run | registry sent (of the image) | blob requests | layers verified |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${CROSS_ROWS[@]}"
  } | tee -a "$WORK/table.md"
fi

EXTRAS=${CLIP_BENCH_EXTRAS:-1}
[[ $QUICK == 1 ]] && EXTRAS=0
if [[ $EXTRAS == 1 ]]; then
  echo
  echo "==> second node sharing the first node's Redis tier (loopback)"
  RPORT=$(free_port)
  redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --maxmemory 2gb >/dev/null &
  PIDS+=($!)
  sleep 0.5
  printf '[cache]\nredis = "redis://127.0.0.1:%s/"\n' "$RPORT" >"$WORK/redis.toml"
  w="print(1)"
  start_once loopback clip "$w" "$WORK/node" --config "$WORK/redis.toml"
  A_S=$COLD_S A_B=$COLD_B
  stop_node "$WORK/node"
  PORT2=$(free_port)
  # Node B: its own root and disk cache, the same Redis; metrics to count span misses.
  dir="$WORK/node2"; rm -rf "$dir"; mkdir -p "$dir"
  start_node "$dir" --config "$WORK/redis.toml" --metrics-address "127.0.0.1:$PORT2"
  img="${LINK_HOST[loopback]}/large:large"; sf="${LINK_STATS[loopback]}"
  drop; b0=$(cat "$sf"); s=$(now)
  "$CLIP" --root "$dir/clip" pull "$img" --address "$dir/containerd.sock" 2>/dev/null
  $NODE_CTR run --rm --snapshotter clip --runc-root "$dir/runc" --fifo-dir "$dir/fifo" "$img" c1 python3 -c "$w" >/dev/null
  e=$(now); sleep 0.3
  B_S=$(echo "$e - $s" | bc); B_B=$(( $(cat "$sf") - b0 ))
  MISSES=$(curl -s "http://127.0.0.1:$PORT2/metrics" | awk '/^clip_cache_misses_total/ {s += $2} END {print s + 0}')
  REMOTE=$(curl -s "http://127.0.0.1:$PORT2/metrics" | awk '/^clip_cache_hits_total\{.*remote/ {s += $2} END {print s + 0}')
  stop_node "$dir"
  {
    echo
    echo "| shared Redis tier, \`print(1)\` | cold start | registry sent | spans from Redis | spans from the registry |"
    echo "|---|---|---|---|---|"
    printf '| node A (fills Redis) | %.2f s | %s | - | - |\n' "$A_S" "$(mib "$A_B")"
    printf '| node B (own disk cache, same Redis) | %.2f s | %s (manifest, config, index, windows) | %s | %s |\n' "$B_S" "$(mib "$B_B")" "$REMOTE" "$MISSES"
  } | tee -a "$WORK/table.md"
fi

if [[ $EXTRAS == 1 ]]; then
  echo
  echo "==> span size (loopback, print(1)): index size and cold start"
  {
    echo
    echo "| span size | index (mount-time part) | checkpoint windows | clip cold start, \`print(1)\` | registry sent |"
    echo "|---|---|---|---|---|"
  } | tee -a "$WORK/table.md"
  for ss in 512KiB 1MiB 4MiB; do
    REPO=large-$(echo "$ss" | tr 'A-Z' 'a-z')
    push_layout "$LAYOUT" large "$REPO"
    "$CLIP" --root "$WORK/pub-$ss" index --span-size "$ss" --push "$REGISTRY/$REPO:large" >/dev/null 2>&1
    read -r IXB CPB < <("$CLIP" --root "$WORK/pub-$ss" inspect "$REGISTRY/$REPO:large" --json | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["index_bytes"], j["checkpoint_bytes"])')
    declare -a cold=() bytes=()
    for r in $(seq "$RUNS"); do
      start_once loopback clip "print(1)" "$WORK/node"
      stop_node "$WORK/node"
      cold+=("$COLD_S"); bytes+=("$COLD_B")
    done
    b=$(echo "${bytes[@]}" | med)
    echo "| $ss | $(mib "$IXB") ($(awk -v b="$IXB" -v t="$IMAGE_BYTES" 'BEGIN {printf "%.3f", b * 100 / t}') %) | $(mib "$CPB") | $(echo "${cold[@]}" | stats) | $(mib "${b%.*}") |" | tee -a "$WORK/table.md"
  done
  REPO=large
fi

if [[ -n $OUT ]]; then
  cp "$WORK/table.md" "$OUT"
  cp "$CSV" "$OUT.csv"
fi
