#!/usr/bin/env bash
# The newcomer demo: installs what clip needs, builds it, starts a local registry on loopback,
# pushes test images built locally (no public registry needed), indexes them with clip, publishes
# the index next to the image, shows where a file's bytes live (what a lazy read will fetch), reads
# one lazily, then starts a container from it through containerd + the clip snapshotter.
# Ends with a short side-by-side cold start: overlayfs full pull vs clip lazy pull of the large
# test image (built once with debootstrap, cached in /var/cache/clip-test-images).
# Usage (as root): bash scripts/demo.sh [--large]   (--large also indexes the large image up front)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/install-deps.sh
echo "==> building clip (release; a few minutes the first time)"
cargo build --release --quiet -p clip-snapshotter
source scripts/bench/lib.sh
WORK=$(mktemp -d /tmp/clip-demo.XXXXXX)
cleanup() {
  stop_node "$WORK/node" || true
  kill "$REGISTRY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
start_registry "$WORK/registry"
echo "==> local registry on $REGISTRY (Debian's docker-registry)"
python3 scripts/mkimage.py layout "$WORK/tiny" latest gen:busybox 2>/dev/null
python3 scripts/mkimage.py layout "$WORK/everytype" latest gen:everytype-base gen:everytype-top 2>/dev/null
push_layout "$WORK/tiny" latest tiny
push_layout "$WORK/everytype" latest everytype
images=("$REGISTRY/tiny:latest" "$REGISTRY/everytype:latest")
if [[ ${1:-} == --large ]]; then
  bash scripts/build-large-image.sh
  push_layout "${CLIP_LARGE_IMAGE:-/var/cache/clip-test-images/large}" large large
  images+=("$REGISTRY/large:large")
fi
for img in "${images[@]}"; do
  echo; echo "==> clip index $img --push"
  "$CLIP" --root "$WORK/root" index "$img" --push
done
echo; echo "==> a fresh node finds the published index in the registry: clip inspect"
"$CLIP" --root "$WORK/fresh-node" inspect "$REGISTRY/everytype:latest"
echo; echo "==> where a file's bytes are (what a lazy read of it fetches)"
"$CLIP" --root "$WORK/fresh-node" inspect "$REGISTRY/everytype:latest" /data/random.bin
echo; echo "==> read it lazily (cold: only its spans come from the registry), then again (warm)"
"$CLIP" --root "$WORK/fresh-node" cat "$REGISTRY/everytype:latest" /data/random.bin --stats | sha256sum
"$CLIP" --root "$WORK/fresh-node" cat "$REGISTRY/everytype:latest" /data/random.bin --stats | sha256sum

echo; echo "==> containerd + the clip snapshotter (proxy plugin): lazy-start a container"
start_node "$WORK/node"
"$CLIP" --root "$WORK/node/clip" pull "$REGISTRY/tiny:latest" --address "$WORK/node/containerd.sock"
$NODE_CTR run --snapshotter clip --rm --runc-root "$WORK/node/runc" --fifo-dir "$WORK/node/fifo" \
  "$REGISTRY/tiny:latest" demo1 sh -c 'echo "in the container: $(cat /etc/hello.txt)"; ls /bin | wc -l'
echo "lazy mounts: $(awk -v d="$WORK/node" 'index($5, d) == 1 && / - fuse/ {print $5}' /proc/self/mountinfo)"
stop_node "$WORK/node"

echo; echo "==> side by side on the ~257 MiB test image (debootstrap + python3/numpy/gcc/perl; built once, ~2 min):"
echo "    containerd's overlayfs (full pull + unpack) vs clip (lazy pull), python3 -c 'print(1)', fresh node each"
bash scripts/build-large-image.sh
bash scripts/bench/coldstart.sh --quick
echo; echo "demo done: the full benchmark (both links, warm starts, Redis, span sizes): bash scripts/bench/run.sh"
