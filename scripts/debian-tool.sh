#!/usr/bin/env bash
# Fetches a package from Debian's development suite (sid) without installing it: a private APT
# configuration (the system's sources, lists and status are not touched), `apt-get download`,
# `dpkg -x` into /var/cache/clip-peers/<package>-<version>. Cached; prints that directory.
# Usage (root): bash scripts/debian-tool.sh PACKAGE VERSION BINARY
#   e.g. bash scripts/debian-tool.sh cosign 3.1.1-2 usr/bin/cosign
set -euo pipefail
PKG=$1 VERSION=$2 BIN=$3
CACHE=/var/cache/clip-peers
DEST="$CACHE/$PKG-$VERSION"
if [[ -x $DEST/$BIN ]]; then
  echo "$DEST"; exit 0
fi
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc/sources.list.d" "$APT/etc/preferences.d" "$CACHE/debs"
cat >"$APT/etc/sources.list.d/sid.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
cat >"$APT/apt.conf" <<CONF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$APT/etc/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$APT/etc/preferences.d";
Dir::State::Lists "$APT/lists";
Dir::Cache "$APT/cache";
Dir::State::status "/dev/null";
CONF
export APT_CONFIG="$APT/apt.conf"
if ! ls "$CACHE"/debs/"$PKG"_"$VERSION"_*.deb >/dev/null 2>&1; then
  echo "fetching $PKG $VERSION from Debian's development suite" >&2
  apt-get update -qq >&2
  (cd "$CACHE/debs" && apt-get download -qq "$PKG=$VERSION" 2>&1 | grep -v unsandboxed >&2 || true)
fi
if ! ls "$CACHE"/debs/"$PKG"_"$VERSION"_*.deb >/dev/null 2>&1; then
  # The development suite moves on: take the version it has now, and say so.
  now=$(apt-cache policy "$PKG" | awk '/Candidate:/ {print $2}')
  [[ -n $now && $now != "(none)" ]] || { echo "$PKG is not in Debian's development suite" >&2; exit 1; }
  echo "warning: $PKG $VERSION is gone from the development suite; using $now" >&2
  VERSION=$now DEST="$CACHE/$PKG-$now"
  if [[ -x $DEST/$BIN ]]; then echo "$DEST"; exit 0; fi
  (cd "$CACHE/debs" && apt-get download -qq "$PKG=$VERSION" 2>&1 | grep -v unsandboxed >&2 || true)
fi
deb=$(ls "$CACHE"/debs/"$PKG"_"$VERSION"_*.deb)
rm -rf "$DEST.tmp"; dpkg -x "$deb" "$DEST.tmp"; mv "$DEST.tmp" "$DEST"
[[ -x $DEST/$BIN ]] || { echo "$PKG $VERSION has no $BIN" >&2; exit 1; }
echo "$DEST"
