#!/usr/bin/env bash
# The one entry point for clip's benchmarks: builds clip (release) and the large test image, runs
# every benchmark (each with its baseline in the same run), and rewrites the generated sections of
# docs/benchmarks.md (between <!-- bench:NAME --> and <!-- /bench:NAME --> markers) and
# docs/coldstart.svg.
#   cold/warm start vs overlayfs (loopback and a shaped 100 Mbit + 10 ms link), second node via
#   Redis, daemon RSS and cache size, span sizes       scripts/bench/coldstart.sh
#   a running container across daemon restarts (handover)          scripts/bench/restart.sh
#   seed scenario: 50 files of one layer vs whole-layer inflate     cargo bench --bench seed
#   FUSE throughput and metadata vs local disk, passthrough          scripts/bench/fuse.sh
#   indexing speed and index size vs gzip -dc                        scripts/bench/index.sh
# Usage (root): bash scripts/bench/run.sh [RUNS]   (default 3; about 30 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
export PATH="$HOME/.cargo/bin:$PATH"
OUT=$(mktemp -d /var/tmp/clip-bench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
echo "==> building (release) and the large test image"
cargo build --release --quiet
bash scripts/build-large-image.sh
{
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $RUNS runs each:"
  echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r),"
  echo "containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1 {print $3}'), docker-registry $(docker-registry --version 2>/dev/null | awk '{print $3}')."
} >"$OUT/machine.md"
echo "==> cold and warm starts (scripts/bench/coldstart.sh $RUNS)"
bash scripts/bench/coldstart.sh "$RUNS" --out "$OUT/coldstart.md"
python3 scripts/bench/plot.py "$OUT/coldstart.md.csv" docs/coldstart.svg
echo "==> daemon restarts under running containers (scripts/bench/restart.sh $RUNS)"
bash scripts/bench/restart.sh "$RUNS" --out "$OUT/restart.md"
echo "==> seed scenario (cargo bench --bench seed)"
cargo bench --quiet -p integration --bench seed 2>/dev/null | grep -E '^\||^[a-z]' >"$OUT/seed.md"
echo "==> FUSE (scripts/bench/fuse.sh $RUNS)"
bash scripts/bench/fuse.sh "$RUNS" >"$OUT/fuse.md"
echo "==> indexing (scripts/bench/index.sh $RUNS)"
bash scripts/bench/index.sh "$RUNS" >"$OUT/index.md"
python3 - docs/benchmarks.md "$OUT" <<'PY'
import pathlib, re, sys
doc = pathlib.Path(sys.argv[1]); out = pathlib.Path(sys.argv[2])
text = doc.read_text()
for part in out.glob("*.md"):
    name = part.stem
    body = part.read_text().strip()
    pat = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
    if not pat.search(text):
        print(f"docs/benchmarks.md has no section for {name}; skipped", file=sys.stderr)
        continue
    text = pat.sub(lambda m: m.group(1) + body + m.group(2), text)
doc.write_text(text)
PY
echo "==> docs/benchmarks.md and docs/coldstart.svg updated"
