#!/usr/bin/env bash
# Builds the stargz peer for the benchmarks from Debian's archive, without installing anything:
# Debian ships stargz-snapshotter's library and ctr-remote but not its daemon
# (containerd-stargz-grpc), so scripts/bench/stargz-grpc/main.go serves the library's
# snapshotter (its own constructor and defaults) as a containerd proxy plugin. Built with Go 1.24
# against trixie's packaged Go sources of stargz-snapshotter 0.14.3 and its dependencies
# (about 210 golang-*-dev packages, 136 MiB, fetched once), in GOPATH mode: no Go module proxy.
# Also fetches ctr-remote 0.14.3 (eStargz conversion, rpull).
# Cached under /var/cache/clip-peers/stargz-build; prints the directory holding
# stargz-grpc and ctr-remote.
# Usage (root): bash scripts/bench/stargz.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
C=/var/cache/clip-peers/stargz-build
A=$C/apt
SRC_SUM=$(sha256sum "$HERE/stargz-grpc/main.go" | cut -c1-16)
if [[ -x $C/bin/stargz-grpc && -x $C/bin/ctr-remote && $(cat "$C/bin/.src" 2>/dev/null) == "$SRC_SUM" ]]; then
  echo "$C/bin"; exit 0
fi
mkdir -p "$C/debs" "$C/bin"
source "$HERE/../private-apt.sh"
rm -f "$A/etc/sources.list.d/trixie.sources"
# trixie alone: one consistent set of Go sources, the one its stargz-snapshotter was built with.
private_apt "$A" trixie
if [[ ! -f $C/debs/.complete ]]; then
  echo "stargz peer: fetching stargz-snapshotter 0.14.3's Go sources and Go 1.24 from Debian trixie" >&2
  apt-get update -qq >&2
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances golang-github-containerd-stargz-snapshotter-dev stargz-snapshotter |
    sed -n 's/^  Depends: //p; /^golang-\|^stargz-/p' | grep -v '^<' |
    grep -E '^(golang-|stargz-snapshotter$)' | grep -vE '^golang-(any|go|src)$' | sort -u >"$C/pkgs.txt"
  (cd "$C/debs" && xargs apt-get download -qq <"$C/pkgs.txt" 2>&1 | grep -v unsandboxed >&2 || true)
  touch "$C/debs/.complete"
fi
rm -rf "$C/root"; mkdir -p "$C/root"
for d in "$C"/debs/*.deb; do dpkg -x "$d" "$C/root"; done
GOROOT=$C/root/usr/lib/go-1.24
[[ -x $GOROOT/bin/go ]] || { echo "stargz peer: Go 1.24 missing from $C/debs" >&2; exit 1; }
rm -rf "$C/gopath"; mkdir -p "$C/gopath/src/clipbench"
cp -r "$HERE/stargz-grpc" "$C/gopath/src/clipbench/"
echo "stargz peer: building stargz-grpc (GOPATH mode, about a minute)" >&2
(cd "$C/gopath/src/clipbench/stargz-grpc" &&
  env GO111MODULE=off GOPATH="$C/gopath:$C/root/usr/share/gocode" GOROOT="$GOROOT" \
    GOCACHE="$C/gocache" GOTOOLCHAIN=local GOFLAGS= "$GOROOT/bin/go" build -o "$C/bin/stargz-grpc" .)
cp "$C/root/usr/bin/ctr-remote" "$C/bin/ctr-remote"
echo "$SRC_SUM" >"$C/bin/.src"
echo "$C/bin"
