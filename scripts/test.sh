#!/usr/bin/env bash
# Installs everything clip needs on Debian 12 and runs every test: formatting, clippy, unit tests
# and the integration tests against real parts (docker-registry, skopeo, openssl, ...).
# Usage (as root): bash scripts/test.sh   (the README's test command; CI runs it too)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
step() { printf '\n==> %s\n' "$*"; }

step "system packages"
bash scripts/install-deps.sh

step "test images (the large one is built once and cached under /var/cache/clip-test-images)"
bash scripts/build-large-image.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "module order (no cycles between the modules of a crate: docs/architecture.md)"
python3 scripts/modcycles.py

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "build"
cargo build --workspace --quiet

step "unit and integration tests"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/clip-test-output.txt
status=${PIPESTATUS[0]}
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' /tmp/clip-test-output.txt | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/clip-test-output.txt | awk '{s+=$1} END {print s+0}')
echo
echo "tests: $passed passed, $failed failed"

step "soak, 5 minutes (scripts/bench/soak.sh 300: SIGKILLs, registry faults, ENOSPC; every byte checked)"
soak=0
SOAK_PLOT=0 CLIP_BIN=$PWD/target/debug/clip bash scripts/bench/soak.sh 300 /var/tmp/clip-soak-ci || soak=$?
[ "$soak" = 0 ] || echo "soak failed: see the summary above"

step "fuzz targets (30 s each, under a memory limit)"
fuzz=0
bash scripts/fuzz.sh 30 || fuzz=$?
[ "$fuzz" = 0 ] || echo "fuzzing failed: see the crash input above (fuzz/artifacts)"
[ "$status" = 0 ] || exit "$status"
[ "$soak" = 0 ] || exit "$soak"
exit "$fuzz"
