#!/usr/bin/env bash
# Indexing speed on the large test image: `clip index` (one streaming pass: download, inflate,
# checkpoints, span digests, DiffID, tar parse) against the plain decompression baseline
# (`gzip -dc` of the same layer blobs, read from local disk), in the same run.
# Usage: scripts/bench/index.sh [RUNS]   (needs a release build and the large image)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
LAYOUT=${CLIP_LARGE_IMAGE:-/var/cache/clip-test-images/large}
[[ -x $CLIP ]] || { echo "build first: cargo build --release" >&2; exit 1; }
[[ -f $LAYOUT/index.json ]] || { echo "missing $LAYOUT: run scripts/build-large-image.sh" >&2; exit 1; }
WORK=$(mktemp -d); trap 'kill $REGISTRY_PID 2>/dev/null; rm -rf "$WORK"' EXIT
start_registry "$WORK/registry"
push_layout "$LAYOUT" large large
IMAGE=$REGISTRY/large:large

manifest=$(python3 -c "import json,sys; print(json.load(open('$LAYOUT/index.json'))['manifests'][0]['digest'][7:])")
layers=$(python3 -c "import json; m=json.load(open('$LAYOUT/blobs/sha256/$manifest')); print(' '.join(l['digest'][7:] for l in m['layers']))")
uncompressed=0
for l in $layers; do uncompressed=$((uncompressed + $(gzip -dc "$LAYOUT/blobs/sha256/$l" | wc -c))); done

declare -A T
for run in $(seq "$RUNS"); do
  s=$(now); for l in $layers; do gzip -dc "$LAYOUT/blobs/sha256/$l" >/dev/null; done; e=$(now)
  T[gzip]+="$(echo "$e - $s" | bc) "
  for jobs in 1 2; do
    s=$(now); "$CLIP" --root "$WORK/root" index "$IMAGE" --force --jobs $jobs >/dev/null; e=$(now)
    T[clip$jobs]+="$(echo "$e - $s" | bc) "
  done
done
report() { # NAME LABEL
  local med; med=$(echo ${T[$1]} | tr ' ' '\n' | median)
  local min max; min=$(echo ${T[$1]} | tr ' ' '\n' | sort -g | head -1); max=$(echo ${T[$1]} | tr ' ' '\n' | sort -g | tail -1)
  printf '| %-44s | %6.2f s | %6.2f-%-6.2f | %6.0f MB/s |\n' "$2" "$med" "$min" "$max" "$(echo "$uncompressed / $med / 1000000" | bc -l)"
}
echo "large image: $(echo $layers | wc -w) layers, $uncompressed bytes of tar; $RUNS runs, median and min-max"
echo "| what | median | min-max | uncompressed rate |"
echo "|---|---|---|---|"
report gzip "baseline: gzip -dc of the layers (local disk, 1 core)"
report clip1 "clip index --jobs 1 (from the registry, one layer at a time: inflate and tar on one thread, sha256 on a second, window zstd on a third)"
report clip2 "clip index --jobs 2 (from the registry, two layers at a time, 2 cores)"
"$CLIP" --root "$WORK/root" inspect "$IMAGE" --json >"$WORK/inspect.json"
python3 - "$WORK/inspect.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
pct = 100 * j["index_bytes"] / j["compressed_bytes"]
print(f"index (mount-time part): {j['index_bytes']} bytes = {pct:.3f}% of {j['compressed_bytes']} compressed; "
      f"checkpoint windows {j['checkpoint_bytes']} bytes; {j['files']} files")
PY
