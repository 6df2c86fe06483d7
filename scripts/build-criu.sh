#!/usr/bin/env bash
# Build one CRIU release into the cache, next to (never over) the installed CRIU:
#     scripts/build-criu.sh VERSION      ->  $cache/criu-VERSION/criu/criu
# Sourced by setup.sh for the same functions (the Debian archive's URI, the pinned tarballs).
#
# Releases (the ones Debian's archive carries):
#   4.2.1, 4.1.1  upstream tarball criu_VERSION.orig.tar.xz from the archive's pool, sha256
#                 pinned below, built with `make criu` (the binary only, 1-3 minutes here).
#   3.17.1        bookworm's binary package criu_3.17.1-2+deb12u2 (apt-get download, checked by
#                 apt against the archive's signed index), unpacked: the binary and its pycriu
#                 (images/*_pb2.py of 3.17.1's .proto files). Bookworm carries no deb-src line
#                 on this host, so no checksum of its source tarball is at hand; the binary is
#                 the same release. It cannot dump on Linux >= 6.x ("vdso: Unexpected rt vDSO
#                 area bounds" in kerndat) but its pycriu re-encodes images into 3.17.1's layout.
# The URI of the archive is read from apt's configuration at run time.
set -euo pipefail

cache=${CRIU_LIVEDUMP_CACHE:-/var/cache/criu-livedump}

say() { printf '%s: %s\n' "${say_as:-build-criu}" "$*" >&2; }

# The Debian archive's URI, read from apt's configuration (deb822 .sources, then one-line lists).
debian_archive() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # First URIs: line of a stanza whose Suites do not end in -security.
    uri=$(awk 'BEGIN{RS=""; FS="\n"} {u=""; s=""; for(i=1;i<=NF;i++){ if($i ~ /^URIs:/){u=$i; sub(/^URIs:[ \t]*/,"",u); split(u,a," "); u=a[1]} if($i ~ /^Suites:/){s=$i} } if(u!="" && s !~ /-security/ && u ~ /debian\/?$/){print u; exit}}' "$f")
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1=="deb" && $0 !~ /security/ { for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\// && $i ~ /debian\/?$/){print $i; exit} }' "$f")
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  done
  return 1
}

# VERSION SHA256 of the upstream tarballs (Debian's criu_VERSION.orig.tar.xz), newest first
src_versions=("4.2.1 29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9"
              "4.1.1 f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe")
# VERSION DEBIAN-VERSION of releases taken from a binary package
deb_versions=("3.17.1 3.17.1-2+deb12u2")

# fetch_source VERSION: prints the unpacked source directory of a pinned tarball release
fetch_source() {
  local want=$1 entry ver sum tarball archive
  for entry in "${src_versions[@]}"; do
    read -r ver sum <<<"$entry"
    [ "$ver" = "$want" ] || continue
    if [ -f "$cache/criu-$ver/.unpacked" ]; then
      echo "$cache/criu-$ver"; return
    fi
    mkdir -p "$cache"
    tarball="$cache/criu_${ver}.orig.tar.xz"
    if [ ! -f "$tarball" ]; then
      archive=$(debian_archive) || { say "no Debian archive URI in the apt sources"; return 1; }
      say "fetching criu_${ver}.orig.tar.xz from the configured Debian archive"
      curl -fsSL -o "$tarball.part" "$archive/pool/main/c/criu/criu_${ver}.orig.tar.xz" \
        || { rm -f "$tarball.part"; say "could not fetch criu_${ver}.orig.tar.xz"; return 1; }
      mv "$tarball.part" "$tarball"
    fi
    if ! echo "$sum  $tarball" | sha256sum -c --status; then
      say "checksum mismatch for $tarball; removing it"; rm -f "$tarball"; return 1
    fi
    rm -rf "$cache/criu-$ver"
    tar -C "$cache" -xJf "$tarball"
    touch "$cache/criu-$ver/.unpacked"
    echo "$cache/criu-$ver"; return
  done
  say "CRIU $want: no pinned source tarball"; return 1
}

# fetch_deb VERSION: unpacks a release's Debian binary package; prints its directory
fetch_deb() {
  local want=$1 entry ver debver dir
  for entry in "${deb_versions[@]}"; do
    read -r ver debver <<<"$entry"
    [ "$ver" = "$want" ] || continue
    dir="$cache/criu-$ver"
    if [ ! -x "$dir/criu/criu" ]; then
      local tmp
      tmp=$(mktemp -d "$cache/.deb-XXXXXX")
      # apt checks the package against the archive's signed index
      (cd "$tmp" && apt-get download -q "criu=$debver" >/dev/null 2>&1) \
        || { rm -rf "$tmp"; say "CRIU $ver: apt-get download criu=$debver failed (no such suite in the apt sources?)"; return 1; }
      dpkg-deb -x "$tmp"/criu_*.deb "$tmp/root"
      rm -rf "$dir"
      mkdir -p "$dir/criu" "$dir/lib"
      mv "$tmp/root/usr/sbin/criu" "$dir/criu/criu"
      mv "$tmp/root/usr/lib/python3/dist-packages/pycriu" "$dir/lib/pycriu"
      rm -rf "$tmp"
    fi
    echo "$dir"; return
  done
  return 1
}

# cross_make SRC TARGET...: make TARGETs in SRC for aarch64 on this host, against the libraries
# of the arm64 root filesystem $CRIU_CROSS_SYSROOT (Debian's gcc-aarch64-linux-gnu with that
# --sysroot; its pkg-config files; the host's protoc and descriptor.proto, the same release's).
# Minutes where a native build under qemu-user takes most of an hour.
cross_make() {
  local src=$1 bin sysroot=$CRIU_CROSS_SYSROOT
  shift
  bin=$src/.cross-bin
  mkdir -p "$bin"
  printf '#!/bin/sh\nexec /usr/bin/aarch64-linux-gnu-gcc --sysroot=%s "$@"\n' "$sysroot" \
    >"$bin/aarch64-linux-gnu-gcc"
  chmod 0755 "$bin/aarch64-linux-gnu-gcc"
  PATH=$bin:$PATH PKG_CONFIG_SYSROOT_DIR=$sysroot \
    PKG_CONFIG_LIBDIR=$sysroot/usr/lib/aarch64-linux-gnu/pkgconfig:$sysroot/usr/share/pkgconfig \
    make -C "$src" -j"$(nproc)" ARCH=aarch64 CROSS_COMPILE=aarch64-linux-gnu- \
    GOOGLE_INCLUDE=/usr/include/google/protobuf "$@"
}

# build_release VERSION: prints the path of that release's criu binary (for aarch64, with
# pycriu, when CRIU_CROSS_SYSROOT names an arm64 root filesystem: see cross_make)
build_release() {
  local ver=$1 src entry
  for entry in "${deb_versions[@]}"; do
    if [ "${entry%% *}" = "$ver" ]; then
      src=$(fetch_deb "$ver") || return 1
      echo "$src/criu/criu"; return
    fi
  done
  src=$(fetch_source "$ver") || return 1
  if [ ! -x "$src/criu/criu" ]; then
    say "building CRIU $ver in $src (1-3 minutes)"
    local start=$SECONDS
    if [ -n "${CRIU_CROSS_SYSROOT:-}" ]; then
      cross_make "$src" criu lib
    else
      make -C "$src" -j"$(nproc)" criu
    fi >"$src/build.log" 2>&1 \
      || { tail -20 "$src/build.log" >&2; say "CRIU $ver: build failed, see $src/build.log"; return 1; }
    say "built CRIU $ver in $((SECONDS - start)) s"
  fi
  echo "$src/criu/criu"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  [ $# = 1 ] || { echo "usage: $0 VERSION   (one of: 4.2.1 4.1.1 3.17.1)" >&2; exit 2; }
  build_release "$1"
fi
