#!/usr/bin/env bash
# Runs clip's fuzz targets (cargo fuzz / libFuzzer). cargo-fuzz needs nightly features; on a
# stable toolchain RUSTC_BOOTSTRAP=1 enables them for this build only.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SECS=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for t in index_decode layer_build; do
  echo "==> fuzzing $t for ${SECS}s"
  cargo fuzz run "$t" -- -max_total_time="$SECS" -rss_limit_mb=2048
done
