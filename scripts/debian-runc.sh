#!/usr/bin/env bash
# runc 1.3 (Debian's development suite) made to run on Debian 12: user-namespaced pods need
# runc >= 1.2 (idmapped mounts), Debian 12 ships 1.1.5, and sid's build needs glibc >= 2.38.
# The binary is copied and pointed (patchelf: interpreter and rpath) at trixie's glibc,
# unpacked beside it; nothing is installed on the system. Cached under /var/cache/clip-peers;
# prints the directory holding `runc`.
# Usage (root): bash scripts/debian-runc.sh
set -euo pipefail
cd "$(dirname "$0")"
RUNC=1.3.6+ds1-1 LIBC=2.41-12+deb13u5
DEST=/var/cache/clip-peers/runc-$RUNC-on-glibc-$LIBC
if [[ -x $DEST/runc ]] && "$DEST/runc" --version >/dev/null 2>&1; then
  echo "$DEST"; exit 0
fi
command -v patchelf >/dev/null || { echo "patchelf is missing: run scripts/install-deps.sh" >&2; exit 1; }
runc_dir=$(bash debian-tool.sh runc "$RUNC" usr/sbin/runc)
libc_dir=$(bash debian-tool.sh libc6 "$LIBC" usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2)
lib="$libc_dir/usr/lib/x86_64-linux-gnu"
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
cp "$runc_dir/usr/sbin/runc" "$DEST.tmp/runc"
patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$lib" "$DEST.tmp/runc"
"$DEST.tmp/runc" --version >/dev/null || { echo "the patched runc does not run" >&2; exit 1; }
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "$DEST"
