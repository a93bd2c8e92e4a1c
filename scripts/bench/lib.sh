# Shared helpers for clip's benchmark scripts (sourced).
set -euo pipefail
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLIP=${CLIP_BIN:-$ROOT_DIR/target/release/clip}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry DIR -> sets REGISTRY (host:port) and REGISTRY_PID
start_registry() {
  local dir=$1 port; port=$(free_port)
  mkdir -p "$dir"
  cat >"$dir/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: 127.0.0.1:$port
YML
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  REGISTRY_PID=$!
  REGISTRY=127.0.0.1:$port
  for _ in $(seq 100); do
    if (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null; then return 0; fi
    kill -0 "$REGISTRY_PID" 2>/dev/null || { echo "docker-registry failed to start:" >&2; cat "$dir/registry.log" >&2; return 1; }
    sleep 0.1
  done
  echo "docker-registry did not listen on $port" >&2; return 1
}

push_layout() { # LAYOUT TAG NAME
  skopeo copy --quiet --dest-tls-verify=false "oci:$1:$2" "docker://$REGISTRY/$3:$2"
}

# shaped_registry DIR NS VETH NET: the registry of DIR (start_registry's) served a second time from
# network namespace NS, behind veth pair VETH with `tc tbf` at 100 Mbit/s each way; NET is the
# /30's first three octets (e.g. 10.231.0). Sets SHAPED_HOST (host:port) and SHAPED_PID.
# stop_shaped NS VETH undoes it.
shaped_registry() {
  local dir=$1 ns=$2 veth=$3 net=$4
  ip netns add "$ns"
  ip link add "$veth" type veth peer name "${veth}p"
  ip link set "${veth}p" netns "$ns"
  ip addr add "$net.1/30" dev "$veth"; ip link set "$veth" up
  ip netns exec "$ns" ip addr add "$net.2/30" dev "${veth}p"
  ip netns exec "$ns" ip link set "${veth}p" up
  ip netns exec "$ns" ip link set lo up
  tc qdisc add dev "$veth" root tbf rate 100mbit burst 256kb latency 100ms
  ip netns exec "$ns" tc qdisc add dev "${veth}p" root tbf rate 100mbit burst 256kb latency 100ms
  sed "s|addr: .*|addr: $net.2:5000|" "$dir/config.yml" >"$dir/config-ns.yml"
  ip netns exec "$ns" docker-registry serve "$dir/config-ns.yml" >"$dir/ns.log" 2>&1 &
  SHAPED_PID=$!
  SHAPED_HOST=$net.2:5000
  for _ in $(seq 100); do (echo >/dev/tcp/"$net.2"/5000) 2>/dev/null && return 0; sleep 0.1; done
  echo "the registry in namespace $ns did not start:" >&2; cat "$dir/ns.log" >&2; return 1
}
stop_shaped() {
  ip netns del "$1" 2>/dev/null || true
  ip link del "$2" 2>/dev/null || true
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.6f\n", (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }

# node_containerd DIR PLUGIN -> containerd (state under DIR) with the snapshotter serving
# DIR/PLUGIN.sock as proxy plugin PLUGIN; sets NODE_CD_PID and NODE_CTR.
node_containerd() {
  local dir=$1 plugin=$2
  cat >"$dir/containerd.toml" <<TOML
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[proxy_plugins.$plugin]
  type = "snapshot"
  address = "$dir/$plugin.sock"
TOML
  containerd --config "$dir/containerd.toml" 2>"$dir/containerd.log" &
  NODE_CD_PID=$!
  NODE_CTR="ctr -a $dir/containerd.sock"
  for _ in $(seq 200); do $NODE_CTR version >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "containerd did not start:" >&2; tail -20 "$dir/containerd.log" >&2; return 1
}

# wait_socket DIR SOCK NAME: waits for a snapshotter's socket, or fails with its log.
wait_socket() {
  for _ in $(seq 200); do [[ -S $2 ]] && return 0; sleep 0.05; done
  echo "$3 did not start:" >&2; tail -20 "$1/snapshotter.log" >&2; return 1
}

# start_node DIR [SNAPSHOTTER ARGS...] -> a containerd with the clip snapshotter as a proxy plugin,
# both with state under DIR; sets NODE_CTR (ctr command prefix), NODE_SNAP_PID, NODE_CD_PID.
start_node() {
  local dir=$1; shift
  mkdir -p "$dir/runc" "$dir/fifo"
  "$CLIP" --root "$dir/clip" snapshotter --address "$dir/clip.sock" --containerd-address "$dir/containerd.sock" "$@" 2>>"$dir/snapshotter.log" &
  NODE_SNAP_PID=$!
  wait_socket "$dir" "$dir/clip.sock" "clip snapshotter"
  node_containerd "$dir" clip
}

# start_soci_node DIR -> the same with SOCI's snapshotter (soci-snapshotter-grpc from $SOCI_BIN,
# see peers.sh) as proxy plugin "soci".
start_soci_node() {
  local dir=$1
  mkdir -p "$dir/runc" "$dir/fifo"
  : >"$dir/soci.toml"
  "$SOCI_BIN/soci-snapshotter-grpc" --address "$dir/soci.sock" --root "$dir/soci" --config "$dir/soci.toml" 2>>"$dir/snapshotter.log" >&2 &
  NODE_SNAP_PID=$!
  wait_socket "$dir" "$dir/soci.sock" "soci snapshotter"
  node_containerd "$dir" soci
}

# start_stargz_node DIR -> the same with stargz-snapshotter 0.14.3's library (stargz-grpc, built
# by stargz.sh into $STARGZ_BIN) as proxy plugin "stargz", with its default configuration.
start_stargz_node() {
  local dir=$1
  mkdir -p "$dir/runc" "$dir/fifo"
  : >"$dir/stargz.toml"
  "$STARGZ_BIN/stargz-grpc" -address "$dir/stargz.sock" -root "$dir/stargz" -config "$dir/stargz.toml" 2>>"$dir/snapshotter.log" >&2 &
  NODE_SNAP_PID=$!
  wait_socket "$dir" "$dir/stargz.sock" "stargz snapshotter"
  node_containerd "$dir" stargz
}

# stargz_image TAG SRC_REPO DST_REPO -> $REGISTRY/DST_REPO:TAG, the eStargz conversion of
# SRC_REPO:TAG by ctr-remote (`image convert --estargz --oci`: no prioritized files, so no
# prefetch), pushed; sets STARGZ_BIN. The conversion (minutes) is kept as an OCI layout in
# $CLIP_IMAGE_CACHE/DST_REPO and pushed from there the next time. Uses WORK.
stargz_image() {
  local tag=$1 src=$2 dst=$3 ctr_remote cache=${CLIP_IMAGE_CACHE:-/var/cache/clip-test-images}/$3
  STARGZ_BIN=$(bash "$ROOT_DIR/scripts/bench/stargz.sh" | tail -1)
  if [[ -f $cache/index.json ]]; then
    push_layout "$cache" "$tag" "$dst"
    echo "eStargz image $REGISTRY/$dst:$tag (from $cache)" >&2
    return 0
  fi
  start_stargz_node "$WORK/stargz-pub"
  ctr_remote="$STARGZ_BIN/ctr-remote -a $WORK/stargz-pub/containerd.sock"
  $ctr_remote images pull --plain-http "$REGISTRY/$src:$tag" >/dev/null
  $ctr_remote image convert --estargz --oci "$REGISTRY/$src:$tag" "$REGISTRY/$dst:$tag" >"$WORK/stargz-convert.log" 2>&1 \
    || { cat "$WORK/stargz-convert.log" >&2; return 1; }
  $ctr_remote images push --plain-http "$REGISTRY/$dst:$tag" >"$WORK/stargz-push.log" 2>&1 \
    || { cat "$WORK/stargz-push.log" >&2; return 1; }
  stop_node "$WORK/stargz-pub"
  rm -rf "$cache.new"
  skopeo copy --quiet --src-tls-verify=false "docker://$REGISTRY/$dst:$tag" "oci:$cache.new:$tag"
  mv "$cache.new" "$cache"
  echo "eStargz image $REGISTRY/$dst:$tag (kept in $cache)" >&2
}

# stop_node DIR: stops tasks, the snapshotter and containerd; detaches leftover mounts under DIR.
stop_node() {
  local dir=$1 id
  if [[ -n ${NODE_CD_PID:-} ]]; then
    for id in $($NODE_CTR tasks ls -q 2>/dev/null); do
      $NODE_CTR tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
      sleep 0.2; $NODE_CTR tasks delete -f "$id" >/dev/null 2>&1 || true
      $NODE_CTR containers delete "$id" >/dev/null 2>&1 || true
    done
  fi
  [[ -n ${NODE_SNAP_PID:-} ]] && { kill -TERM "$NODE_SNAP_PID" 2>/dev/null; wait "$NODE_SNAP_PID" 2>/dev/null || true; }
  [[ -n ${NODE_CD_PID:-} ]] && { kill -TERM "$NODE_CD_PID" 2>/dev/null; wait "$NODE_CD_PID" 2>/dev/null || true; }
  NODE_SNAP_PID=""; NODE_CD_PID=""
  # CLIP_BENCH_LOGS=DIR keeps each node's snapshotter log (set CLIP_LOG for more detail).
  if [[ -n ${CLIP_BENCH_LOGS:-} && -f $dir/snapshotter.log ]]; then
    mkdir -p "$CLIP_BENCH_LOGS"; cp "$dir/snapshotter.log" "$CLIP_BENCH_LOGS/snapshotter.$(date +%s.%N).log"
  fi
  awk -v d="$dir" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# bench_proxy NAME UPSTREAM DELAY_MS -> a counting proxy (proxy.py) in front of UPSTREAM, adding
# DELAY_MS each way; sets PROXY (host:port) and STATS (byte counter file; STATS.req: blob GETs);
# its pid joins PIDS. Uses WORK; with CLIP_BENCH_TRACE=PREFIX it writes PREFIX.NAME.
bench_proxy() {
  local port; port=$(free_port)
  STATS="$WORK/$1.bytes"; echo 0 >"$STATS"; echo 0 >"$STATS.req"
  PROXY_TRACE=${CLIP_BENCH_TRACE:+$CLIP_BENCH_TRACE.$1} python3 "$ROOT_DIR/scripts/bench/proxy.py" "$port" "$2" "$3" "$STATS" &
  PIDS+=($!)
  PROXY=127.0.0.1:$port
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && return 0; sleep 0.05; done
  echo "proxy did not start" >&2; return 1
}

# soci_index LAYOUT TAG REPO -> SOCI's own index of the image (soci create on a node of its own,
# pushed to $REGISTRY); sets SOCI_INDEX (its digest) and SOCI_BIN. Uses WORK.
soci_index() {
  local layout=$1 tag=$2 repo=$3
  SOCI_BIN=$(bash "$ROOT_DIR/scripts/bench/peers.sh" 2>/dev/null | tail -1)/usr/bin
  push_layout "$layout" "$tag" "$repo"
  start_soci_node "$WORK/soci-pub"
  $NODE_CTR images pull --plain-http "$REGISTRY/$repo:$tag" >/dev/null
  # The soci CLI keeps what it creates in its own content store (/var/lib/soci-snapshotter-grpc).
  "$SOCI_BIN/soci" --address "$WORK/soci-pub/containerd.sock" create "$REGISTRY/$repo:$tag" >"$WORK/soci-create.log" 2>&1
  "$SOCI_BIN/soci" --address "$WORK/soci-pub/containerd.sock" push --plain-http "$REGISTRY/$repo:$tag" >"$WORK/soci-push.log" 2>&1
  SOCI_INDEX=$(awk '/successfully pushed artifact with digest/ {d=$NF} END {print d}' "$WORK/soci-push.log")
  stop_node "$WORK/soci-pub"
  [[ $SOCI_INDEX == sha256:* ]] || { echo "soci push gave no index digest:" >&2; cat "$WORK/soci-create.log" "$WORK/soci-push.log" >&2; return 1; }
  echo "SOCI index $SOCI_INDEX" >&2
}
