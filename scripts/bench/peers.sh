#!/usr/bin/env bash
# Fetches the lazy-pulling peers the benchmarks compare against from Debian's archive, without
# installing them (scripts/debian-tool.sh: private APT configuration, `apt-get download`,
# `dpkg -x` into /var/cache/clip-peers/<name>-<version>). Cached.
#   soci-snapshotter 0.4.1 (Debian's development suite): soci-snapshotter-grpc + the soci CLI
# Usage (root): bash scripts/bench/peers.sh   -> prints the directory holding usr/bin
set -euo pipefail
SOCI_VERSION=0.4.1-6
DEST=$(bash "$(dirname "$0")/../debian-tool.sh" soci-snapshotter "$SOCI_VERSION" usr/bin/soci-snapshotter-grpc)
"$DEST/usr/bin/soci" --version >&2
echo "$DEST"
