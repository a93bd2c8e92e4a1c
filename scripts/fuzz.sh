#!/usr/bin/env bash
# Runs clip's fuzz targets (cargo fuzz / libFuzzer). cargo-fuzz needs nightly features; on a
# stable toolchain RUSTC_BOOTSTRAP=1 enables them for this build only.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SECS=${1:-60}
# The fuzz build (sanitizers, its own flags) is kept between runs; cargo rebuilds what changed.
TARGET_DIR=${CLIP_FUZZ_TARGET_DIR:-/var/cache/clip-fuzz-target}
# cargo-fuzz is built once and kept under /var/cache/clip-tools (rebuildable).
export PATH="/var/cache/clip-tools/bin:$PATH"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --root /var/cache/clip-tools
export RUSTC_BOOTSTRAP=1
# Real objects seed the ELF reader's corpus (a program and a library of this machine).
mkdir -p fuzz/corpus/elf_needed
for f in /usr/bin/true "/usr/lib/$(uname -m)-linux-gnu/libdl.so.2"; do
  [[ -f $f ]] && cp "$f" "fuzz/corpus/elf_needed/seed-$(basename "$f")"
done
# The keeper's protocol starts from every kind of message.
mkdir -p fuzz/corpus/keeper_message
printf 'P 7 2199023255552 44' > fuzz/corpus/keeper_message/seed-hold
printf 'O 7 13 p 3' > fuzz/corpus/keeper_message/seed-open
printf 'S 7 12 c 0 2' > fuzz/corpus/keeper_message/seed-opened
# Encoded indexes of real layers (committed; scripts/fuzz-seeds.sh makes them) seed the index
# targets, so that fuzzing starts past the header and checksum.
for t in index_decode index_read zstd_toc zstd_seek; do
  mkdir -p "fuzz/corpus/$t"
  cp fuzz/seeds/$t/* "fuzz/corpus/$t/"
done
for t in index_decode index_read layer_build elf_needed keeper_message zstd_toc zstd_seek; do
  echo "==> fuzzing $t for ${SECS}s"
  # Under a memory limit: any single allocation above 256 MiB, or 1 GiB resident, is a failure.
  cargo fuzz run --target-dir "$TARGET_DIR" "$t" -- -max_total_time="$SECS" -rss_limit_mb=1024 -malloc_limit_mb=256
done
