#!/usr/bin/env bash
# Makes the fuzzing seeds committed under fuzz/seeds/: encoded indexes of real layers (the
# test images' generators: busybox, users, every entry type), with small spans so that each
# has several spans, checkpoint windows and every kind of entry. Deterministic: run it again
# after a change to the index format and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build -q -p clip-core --example index_seed
for t in index_decode index_read; do mkdir -p "fuzz/seeds/$t"; done
for g in busybox users everytype-base everytype-top; do
  python3 scripts/mkimage.py gen "$g" "$tmp/$g.tar"
  for span in 65536 1048576; do
    target/debug/examples/index_seed "$tmp/$g.tar" "$tmp/$g-$span.idx" "$span"
    for t in index_decode index_read; do cp "$tmp/$g-$span.idx" "fuzz/seeds/$t/$g-$span.idx"; done
  done
done
ls -l fuzz/seeds/*
