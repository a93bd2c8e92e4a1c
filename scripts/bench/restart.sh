#!/usr/bin/env bash
# Daemon restarts under a running container: what a process in a container that is already
# running on clip's lazy mounts sees when the clip snapshotter restarts.
#
# Each run: a fresh node (containerd + clip snapshotter), `clip pull` of the large test image, a
# long-running container, one `python3 -c 'import numpy'` in it (spans now cached). Then, with the
# kernel page cache dropped each time, the same exec in the same container:
#   baseline   daemon up the whole time
#   kill -9    daemon killed; the exec starts while no daemon runs (it waits); a new daemon is
#              started 1 s later; timed from that start to the exec's exit
#   SIGTERM    the same with a clean stop
#   no handover (--no-handover): kill -9 and restart; the exec fails (the FUSE connection died
#              with the daemon) - reported as its exit status
# Usage (root; release build; large image built):
#   scripts/bench/restart.sh [RUNS] [--out FILE]
source "$(dirname "$0")/lib.sh"
RUNS=3 OUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift;;
    *) RUNS=$1;;
  esac
  shift
done
LAYOUT=${CLIP_LARGE_IMAGE:-/var/cache/clip-test-images/large}
[[ -x $CLIP ]] || { echo "build first: cargo build --release" >&2; exit 1; }
[[ -d $LAYOUT ]] || { echo "build the large image first: bash scripts/build-large-image.sh" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/clip-restart.XXXXXX)
cleanup() {
  stop_node "$WORK/node" 2>/dev/null || true
  kill "${REGISTRY_PID:-}" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
stats() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f s (%.2f-%.2f)", m, a[1], a[NR]}'; }
W="import numpy; print(numpy.__version__)"

echo "==> registry, image, published index" >&2
start_registry "$WORK/registry"
push_layout "$LAYOUT" large large
"$CLIP" --root "$WORK/publisher" index --push "$REGISTRY/large:large" >/dev/null 2>&1
IMG="$REGISTRY/large:large"

# snap_start DIR [ARGS] / snap_kill SIGNAL: the node's snapshotter alone
snap_start() {
  local dir=$1; shift
  rm -f "$dir/clip.sock"
  "$CLIP" --root "$dir/clip" snapshotter --address "$dir/clip.sock" --containerd-address "$dir/containerd.sock" "$@" 2>>"$dir/snapshotter.log" &
  NODE_SNAP_PID=$!
  for _ in $(seq 400); do [[ -S $dir/clip.sock ]] && return 0; sleep 0.01; done
  echo "clip snapshotter did not restart:" >&2; tail "$dir/snapshotter.log" >&2; return 1
}
snap_kill() { kill "-$1" "$NODE_SNAP_PID"; wait "$NODE_SNAP_PID" 2>/dev/null || true; }
exec_w() { $NODE_CTR tasks exec --exec-id "$1" live python3 -c "$W"; }

# one_run ARGS... -> BASE_S, KILL_S, TERM_S (or NOHAND exit status with --no-handover)
one_run() {
  local dir="$WORK/node" s e pid st
  stop_node "$dir" 2>/dev/null || true
  rm -rf "$dir"; mkdir -p "$dir"
  start_node "$dir" "$@"
  "$CLIP" --root "$dir/clip" pull "$IMG" --address "$dir/containerd.sock" 2>/dev/null
  $NODE_CTR run -d --snapshotter clip --runc-root "$dir/runc" --fifo-dir "$dir/fifo" "$IMG" live sleep 3600 >/dev/null
  exec_w warmup >/dev/null
  drop; s=$(now); exec_w base >/dev/null; e=$(now); BASE_S=$(echo "$e - $s" | bc)
  if [[ " $* " == *" --no-handover "* ]]; then
    snap_kill KILL; snap_start "$dir" "$@"; drop
    st=0; exec_w nohand >/dev/null 2>"$dir/nohand.err" || st=$?
    NOHAND="exit status $st: $(tr -d '\r|' <"$dir/nohand.err" | tail -1 | cut -c1-160)"
    stop_node "$dir"
    return
  fi
  for sig in KILL TERM; do
    snap_kill "$sig"; drop
    exec_w "after$sig" >"$dir/after.out" 2>&1 &
    pid=$!
    sleep 1
    kill -0 "$pid" 2>/dev/null || { echo "the exec did not wait for the daemon:" >&2; cat "$dir/after.out" >&2; exit 1; }
    s=$(now); snap_start "$dir" "$@"
    wait "$pid" || { echo "the exec failed across the restart:" >&2; cat "$dir/after.out" >&2; exit 1; }
    e=$(now)
    printf -v "${sig}_S" '%s' "$(echo "$e - $s" | bc)"
  done
  stop_node "$dir"
}

declare -a base=() kill9=() term=()
for r in $(seq "$RUNS"); do
  one_run
  base+=("$BASE_S"); kill9+=("$KILL_S"); term+=("$TERM_S")
  echo "  run $r: baseline ${BASE_S}s, across kill -9 ${KILL_S}s, across SIGTERM ${TERM_S}s" >&2
done
one_run --no-handover
echo "  --no-handover: $NOHAND" >&2

{
  echo "| \`python3 -c 'import numpy'\` exec'd in a container already running on lazy mounts (page cache dropped) | time |"
  echo "|---|---|"
  echo "| daemon up (baseline) | $(echo "${base[@]}" | stats) |"
  echo "| daemon killed (\`kill -9\`), exec waiting, new daemon started: from its start to the exec's exit | $(echo "${kill9[@]}" | stats) |"
  echo "| the same after SIGTERM | $(echo "${term[@]}" | stats) |"
  echo "| \`--no-handover\`, \`kill -9\` and restart | fails ($NOHAND) |"
} | tee ${OUT:+"$OUT"}
