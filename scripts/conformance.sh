#!/usr/bin/env bash
# containerd's snapshotter test suite (snapshots/testsuite of containerd 1.6, from Debian's
# golang-github-containerd-containerd-dev, built with Debian's Go) against the clip snapshotter
# daemon through containerd's proxy client, a fresh daemon per case. The test binary is cached
# in /var/cache/clip-go (rebuilt when integration/conformance changes).
# Usage (root): bash scripts/conformance.sh [CLIP_BINARY]   (default: target/debug/clip)
set -euo pipefail
cd "$(dirname "$0")/.."
CLIP_BIN=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/debug/clip}")
[[ -x $CLIP_BIN ]] || { echo "conformance: no clip binary at $CLIP_BIN (cargo build first)" >&2; exit 1; }
for f in /usr/bin/go /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite/testsuite.go; do
  [[ -e $f ]] || { echo "conformance: $f is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
CACHE=/var/cache/clip-go
mkdir -p "$CACHE"
stamp=$(cat integration/conformance/*.go | sha256sum | cut -c1-16)
bin="$CACHE/conformance-$stamp.test"
if [[ ! -x $bin ]]; then
  echo "conformance: building containerd's snapshotter test suite with $(go version | cut -d' ' -f3)" >&2
  (cd integration/conformance &&
    GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$CACHE/cache" GOFLAGS=-buildvcs=false \
      go test -c -o "$bin.tmp" .)
  mv "$bin.tmp" "$bin"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
CLIP_BIN=$CLIP_BIN TMPDIR=$work "$bin" -test.v -test.timeout 600s
