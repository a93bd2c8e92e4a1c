# Sourced. private_apt DIR "SUITES": an APT configuration of its own under DIR for Debian's
# SUITES (e.g. "sid trixie"), from the archive mirror the system uses; the system's sources,
# lists and package status are not touched. Exports APT_CONFIG; run `apt-get update` next.
private_apt() {
  local apt=$1 suites=$2
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/etc/sources.list.d" "$apt/etc/preferences.d"
  cat >"$apt/etc/sources.list.d/private.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suites
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat >"$apt/apt.conf" <<CONF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$apt/etc/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$apt/etc/preferences.d";
Dir::State::Lists "$apt/lists";
Dir::Cache "$apt/cache";
Dir::State::status "/dev/null";
APT::Architecture "amd64";
CONF
  export APT_CONFIG="$apt/apt.conf"
}
