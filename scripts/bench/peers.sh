#!/usr/bin/env bash
# Fetches the lazy-pulling peers the benchmarks compare against from Debian's archive, without
# installing them: a private APT configuration (the system's sources, lists and status are not
# touched), `apt-get download`, `dpkg -x` into /var/cache/clip-peers/<name>-<version>. Cached.
#   soci-snapshotter 0.4.1 (Debian's development suite): soci-snapshotter-grpc + the soci CLI
# Usage (root): bash scripts/bench/peers.sh   -> prints the directory holding usr/bin
set -euo pipefail
CACHE=/var/cache/clip-peers
SOCI_VERSION=0.4.1-6
DEST="$CACHE/soci-$SOCI_VERSION"
if [[ -x $DEST/usr/bin/soci-snapshotter-grpc && -x $DEST/usr/bin/soci ]]; then
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
echo "peers: fetching soci-snapshotter $SOCI_VERSION from Debian's development suite" >&2
apt-get update -qq >&2
(cd "$CACHE/debs" && apt-get download -qq "soci-snapshotter=$SOCI_VERSION" 2>&1 | grep -v unsandboxed >&2 || true)
deb=$(ls "$CACHE"/debs/soci-snapshotter_"$SOCI_VERSION"_*.deb)
rm -rf "$DEST.tmp"; dpkg -x "$deb" "$DEST.tmp"; mv "$DEST.tmp" "$DEST"
"$DEST/usr/bin/soci" --version >&2
echo "$DEST"
