#!/usr/bin/env bash
# Fetches a package from Debian's development suite (sid) or its stable suite (trixie) without
# installing it: a private APT configuration (the system's sources, lists and status are not
# touched), `apt-get download`, `dpkg -x` into /var/cache/clip-peers/<package>-<version>. Cached;
# prints that directory.
# Usage (root): bash scripts/debian-tool.sh PACKAGE VERSION BINARY
#   e.g. bash scripts/debian-tool.sh cosign 3.1.1-2 usr/bin/cosign
set -euo pipefail
PKG=$1 VERSION=$2 BIN=$3
CACHE=/var/cache/clip-peers
DEST="$CACHE/$PKG-$VERSION"
if [[ -x $DEST/$BIN ]]; then
  echo "$DEST"; exit 0
fi
source "$(dirname "$0")/private-apt.sh"
mkdir -p "$CACHE/debs"
# The old configuration named its sources file sid.sources; one file of sources only.
rm -f "$CACHE/apt/etc/sources.list.d/sid.sources"
private_apt "$CACHE/apt" "sid trixie"
if ! ls "$CACHE"/debs/"$PKG"_"$VERSION"_*.deb >/dev/null 2>&1; then
  echo "fetching $PKG $VERSION from Debian's development suite" >&2
  apt-get update -qq >&2
  (cd "$CACHE/debs" && apt-get download -qq "$PKG=$VERSION" 2>&1 | grep -v unsandboxed >&2 || true)
fi
if ! ls "$CACHE"/debs/"$PKG"_"$VERSION"_*.deb >/dev/null 2>&1; then
  # The suites move on (new Debian revisions, security updates): take the newest version of
  # the same upstream major.minor they have now, and say so.
  series=$(sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"$VERSION")
  now=$(apt-cache madison "$PKG" | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
    grep -F "$series." | sort -V | tail -1 || true)
  [[ -n $now ]] || { echo "$PKG $series.x is not in Debian's sid or trixie suites" >&2; exit 1; }
  echo "warning: $PKG $VERSION is gone from Debian's suites; using $now" >&2
  VERSION=$now DEST="$CACHE/$PKG-$now"
  if [[ -x $DEST/$BIN ]]; then echo "$DEST"; exit 0; fi
  (cd "$CACHE/debs" && apt-get download -qq "$PKG=$VERSION" 2>&1 | grep -v unsandboxed >&2 || true)
fi
deb=$(ls "$CACHE"/debs/"$PKG"_"$VERSION"_*.deb)
rm -rf "$DEST.tmp"; dpkg -x "$deb" "$DEST.tmp"; mv "$DEST.tmp" "$DEST"
[[ -x $DEST/$BIN ]] || { echo "$PKG $VERSION has no $BIN" >&2; exit 1; }
echo "$DEST"
