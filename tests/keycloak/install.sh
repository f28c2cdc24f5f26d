#!/usr/bin/env bash
# Installs Keycloak (the Quarkus distribution, a zip from Maven Central) into
# a cache outside the clone, keyed by version, and prints its home directory
# on stdout. The zip is checked against Maven Central's published .sha1
# before it is unpacked; a zip already in the download directory is reused
# when its checksum matches. A second run finds the installed home and does
# nothing (no network).
#
# The home also gets one optimized build (`kc.sh build`) with the options the
# tests start it with (see keycloak_support.py), so that `kc.sh start
# --optimized` skips the build at every start.
#
#   bash tests/keycloak/install.sh             # prints e.g. /var/tmp/tokenpolicy-keycloak/26.7.3/keycloak-26.7.3
#   KEYCLOAK_VERSION=26.7.3 KEYCLOAK_CACHE=/some/dir bash tests/keycloak/install.sh
#
# Java: JAVA_HOME if it is a Java 25, else the first Java 25 JDK under
# /usr/lib/jvm (Temurin 25 on these machines). The chosen JAVA_HOME is
# written to <home>/.java_home for the test support.
set -euo pipefail

version="${KEYCLOAK_VERSION:-26.7.3}"
cache="${KEYCLOAK_CACHE:-/var/tmp/tokenpolicy-keycloak}"
java_major_wanted=25
base="https://repo1.maven.org/maven2/org/keycloak/keycloak-quarkus-dist/$version"
zip_name="keycloak-quarkus-dist-$version.zip"
dl="$cache/dl"
root="$cache/$version"
home="$root/keycloak-$version"
# The options baked into the optimized build. Changing them changes the
# stamp, so the build runs again.
build_opts=(--db=dev-file --health-enabled=true --http-management-health-enabled=false)
build_stamp="build:${build_opts[*]}"

log() { printf '[keycloak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[keycloak] ERROR: %s\n' "$*" >&2; exit 1; }

java_major() {
  # `java -version` prints e.g.: openjdk version "25.0.3" 2026-04-21 LTS
  "$1/bin/java" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}'
}

find_java() {
  local candidates=()
  [ -n "${JAVA_HOME:-}" ] && candidates+=("$JAVA_HOME")
  candidates+=(/usr/lib/jvm/temurin-25-jdk-amd64)
  local d
  for d in /usr/lib/jvm/*; do candidates+=("$d"); done
  for d in "${candidates[@]}"; do
    [ -x "$d/bin/java" ] || continue
    if [ "$(java_major "$d")" = "$java_major_wanted" ]; then
      (cd "$d" && pwd -P)
      return 0
    fi
  done
  return 1
}

java_home=$(find_java) || die "no Java $java_major_wanted found (JAVA_HOME=${JAVA_HOME:-unset}, /usr/lib/jvm: $(ls /usr/lib/jvm 2>/dev/null | tr '\n' ' ')). Keycloak $version runs on Java $java_major_wanted here: install a Temurin $java_major_wanted JDK under /usr/lib/jvm or set JAVA_HOME."
export JAVA_HOME="$java_home"

mkdir -p "$dl" "$root"
# One installer at a time per cache (two test runs may start together).
exec 9>"$cache/.install-$version.lock"
flock 9

if [ -f "$home/.installed" ] && [ "$(cat "$home/.built" 2>/dev/null)" = "$build_stamp" ]; then
  echo "$java_home" >"$home/.java_home"
  echo "$home"
  exit 0
fi

fetch() { # url out
  curl -fsSL --retry 3 --retry-delay 2 --connect-timeout 15 -o "$2.part" "$1" && mv "$2.part" "$2"
}

sha1_file="$dl/$zip_name.sha1"
if [ ! -f "$home/.installed" ]; then
  # The published checksum: fetched every time a zip must be checked, and
  # kept beside the zip so that a later install works offline.
  if ! fetch "$base/$zip_name.sha1" "$sha1_file.new"; then
    [ -s "$sha1_file" ] || die "cannot fetch $base/$zip_name.sha1, and no earlier copy in $dl"
    log "cannot fetch the .sha1 from Maven Central: using the copy fetched earlier ($sha1_file)"
  else
    mv "$sha1_file.new" "$sha1_file"
  fi
  want=$(awk '{print $1; exit}' "$sha1_file" | tr 'A-F' 'a-f')
  [[ "$want" =~ ^[0-9a-f]{40}$ ]] || die "$sha1_file does not hold a SHA-1: $(head -c 100 "$sha1_file")"

  zip="$dl/$zip_name"
  if [ -f "$zip" ] && [ "$(sha1sum "$zip" | awk '{print $1}')" = "$want" ]; then
    log "reusing $zip (sha1 $want matches Maven Central)"
  else
    [ -f "$zip" ] && log "$zip does not match Maven Central's sha1: downloading it again"
    start=$(date +%s)
    log "downloading $base/$zip_name"
    fetch "$base/$zip_name" "$zip" || die "download of $base/$zip_name failed"
    got=$(sha1sum "$zip" | awk '{print $1}')
    if [ "$got" != "$want" ]; then
      rm -f "$zip"
      die "$zip_name: sha1 $got, Maven Central publishes $want; the download is removed"
    fi
    log "downloaded $(du -m "$zip" | awk '{print $1}') MiB in $(( $(date +%s) - start )) s, sha1 matches"
  fi

  log "unpacking into $root"
  tmp="$root/.unpack.$$"
  rm -rf "$root"/.unpack.* "$home"
  mkdir -p "$tmp"
  unzip -q "$zip" -d "$tmp"
  [ -x "$tmp/keycloak-$version/bin/kc.sh" ] || die "the zip has no keycloak-$version/bin/kc.sh"
  mv "$tmp/keycloak-$version" "$home"
  rmdir "$tmp"
  echo "$want" >"$home/.installed"
fi

log "kc.sh build ${build_opts[*]}"
start=$(date +%s)
# The build writes into the home (lib/quarkus); its output is only shown
# when it fails.
if ! out=$("$home/bin/kc.sh" build "${build_opts[@]}" 2>&1); then
  printf '%s\n' "$out" >&2
  die "kc.sh build failed"
fi
echo "$build_stamp" >"$home/.built"
log "built in $(( $(date +%s) - start )) s"
echo "$java_home" >"$home/.java_home"
echo "$home"
